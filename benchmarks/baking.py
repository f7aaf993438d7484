"""Benchmark: phase 6 on one model, the before/after table measured in one run.

The baking team (a local Ray, the preset's ``baking:`` settings, ``torch.compile`` measured
unless ``--set baking.compile=false``) bakes tools and the persona into the input model, and the
script prints what the phase measured, side by side:

- before -> after on the held-out questions (their lookup keys never trained on), through the
  inference loop that executes the calls: tool-call accuracy, task accuracy, tool calls per
  prompt; held-out perplexity; the persona's KL(prompted || unprompted) on held-out continuations
  and its reduction factor; each trait's score (the model without the prompt, with it, and baked);
- every optimiser's measured effect on this machine and whether it was applied (an optimisation
  that does not keep the outputs or is not faster is reported, not applied): hardware target,
  activation checkpointing, weight tying, storage dtype, fused QKV, folded norms, batched
  generation, KV cache, torch.compile; and the profiler's latency of the baked model, as stored
  and with what was applied, vs the input.

The input model: ``--model DIR`` (an HF model dir, e.g. a run's ``05_forge/models/forge``), else
the preset's phases 1-5 are run first into a temporary folder (about 130 s on 2 cores for tiny).

Usage: python benchmarks/baking.py [--model DIR] [--preset tiny] [--set baking.KEY=VALUE ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)


def _run(cfg, root: Path, phases: list[str], model: Path | None = None):
    from coordinator.pipeline import parse_selection, run_pipeline
    from coordinator.runfolder import RunFolder
    from coordinator.tracking import Tracker

    run = RunFolder(root)
    plan = parse_selection(phases)
    run.create(run_id=root.name[:12], config=cfg.model_dump(mode="json"), seed=cfg.seed, plan=[s.name for s in plan])
    results = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, root.name[:12]),
                           input_models=[model] if model else None)
    return run, results


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")  # a table cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="input HF model dir (default: run the preset's phases 1-5)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON")
    args = parser.parse_args(argv)

    import ray

    from coordinator.config import load_config

    cfg, _ = load_config(preset=args.preset, overrides=["wandb.mode=disabled", "baking.compile=true", *args.set])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-baking-") as tmp:
        model = args.model
        if model is None:
            t0 = time.perf_counter()
            run, results = _run(cfg, Path(tmp) / "upstream", ["cognate", "evomerge", "quietstar", "bitnet", "forge"])
            model = run.resolve(results[-1].model)
            print(f"phases 1-5 of {args.preset}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t0 = time.perf_counter()
        run, results = _run(cfg, Path(tmp) / "baking", ["baking"], model=model)
        seconds = time.perf_counter() - t0
        result = results[-1]
        if not result.success:
            print(f"phase 6 failed: {result.error}", file=sys.stderr)
            return 1
        tables = json.loads((run.phase_dir(6, "baking") / "tables.json").read_text())
    ray.shutdown()
    if args.json:
        print(json.dumps({"seconds": seconds, "metrics": result.metrics, **tables}, indent=1, default=str))
        return 0
    print(f"# phase 6 on {args.preset} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads per agent 1): {seconds:.1f} s\n")
    print("| measure | before | after |\n|---|---|---|")
    for row in tables["before_after"]:
        print(f"| {_fmt(row['measure'])} | {_fmt(row['before'])} | {_fmt(row['after'])} |")
    m = result.metrics
    print(f"\npersona KL reduction: {m['baking/persona/kl_reduction']:.2f}x; tool calls kept by Toolformer's filter: "
          f"{m['baking/tool_data/kept']} of {m['baking/tool_data/candidates']} candidates\n")
    print("| optimisation | measured effect | applied | why |\n|---|---|---|---|")
    for row in tables["optimisations"]:
        cells = (row["optimisation"], row["effect"], row["applied"], row.get("reason", ""))
        print("| " + " | ".join(_fmt(c) for c in cells) + " |")
    print(f"\nforward latency vs the input (timed interleaved): baked {m['baking/profile/baked/latency_ratio']:.3f}x, "
          f"with the applied optimisations {m['baking/profile/optimised/latency_ratio']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
