"""Benchmark: phase 7's search for each target profile this machine can run, the input model vs
the certified winner, measured in one run.

For every profile (``--profiles``, default all built-in ones) the script runs the whole search
in this process (``phases.adas.inline.run_search``: the functions the ADAS team's agents call,
one after another) on the input model, and prints the input (fp32 eager, the profile's most
threads) beside the winner: p50/p95/p99 latency of one call and of one generated token, peak
resident growth while loading and running, bytes on disk, held-out accuracy, parity vs the fp32
eager twin; then the Pareto front. A profile the machine cannot run (``cloud-gpu`` without a
GPU) is listed with the reason; a profile no candidate meets is listed with the requirements
none met.

The input model: ``--model DIR`` (an HF model dir, e.g. a run's ``06_baking/models/baked``), else
the preset's phases 1-6 are run first into a temporary folder (about 250 s on 2 cores for tiny).

Usage: python benchmarks/adas.py [--model DIR] [--preset tiny] [--profiles edge-cpu mobile]
       [--set adas.KEY=VALUE ...] [--json]
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

_ROWS = (("call p50 ms", "call_p50_ms"), ("call p95 ms", "call_p95_ms"), ("call p99 ms", "call_p99_ms"),
         ("token p50 ms", "token_p50_ms"), ("token p95 ms", "token_p95_ms"), ("token p99 ms", "token_p99_ms"),
         ("peak memory MiB", "memory_bytes"), ("disk MiB", "disk_bytes"), ("held-out accuracy", "accuracy"),
         ("parity (rel. logit diff)", "parity"), ("FLOPs per token", "flops_per_token"))


def _value(metrics: dict, key: str):
    v = metrics.get(key)
    if v is None:
        return None
    return v / 2 ** 20 if key in ("memory_bytes", "disk_bytes") else v


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _model_dir(args, cfg, tmp: Path) -> Path:
    if args.model:
        return args.model
    from coordinator.pipeline import parse_selection, run_pipeline
    from coordinator.runfolder import RunFolder
    from coordinator.tracking import Tracker

    root = tmp / "run"
    run = RunFolder(root)
    plan = parse_selection(["cognate", "evomerge", "quietstar", "bitnet", "forge", "baking"])
    run.create(run_id="adasbench", config=cfg.model_dump(mode="json"), seed=cfg.seed, plan=[s.name for s in plan])
    run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "adasbench"))
    return root / "06_baking" / "models" / "baked"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="input HF model dir (default: run the preset's phases 1-6)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--profiles", nargs="+", default=None, help="profiles to search (default: all built-in)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    args = parser.parse_args(argv)

    import torch

    from actors.io import load_hf
    from coordinator.config import load_config
    from phases.adas.inline import choose_device, run_search
    from phases.adas.profiles import BUILTIN_PROFILES
    from phases.adas.recipes import Recipe
    from phases.adas.search import OBJECTIVES
    from phases.data import load_corpus

    cfg, _ = load_config(preset=args.preset, overrides=["wandb.mode=disabled", *args.set])
    torch.set_num_threads(1)  # the runners set each recipe's threads around its calls
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="adas-bench-") as tmp:
        model_dir = _model_dir(args, cfg, Path(tmp))
        model = load_hf(model_dir)
        corpus = load_corpus(cfg.data, seed=cfg.seed)
        a = cfg.adas
        windows = corpus.windows("heldout", max_windows=a.eval_batch_size * a.eval_batches)
        calibration = corpus.batch(0, a.calibration_windows, corpus.config.seq_len, cfg.seed)[:, :-1]
        for name in args.profiles or list(BUILTIN_PROFILES):
            profile = a.model_copy(update={"profile": name}).target()
            try:
                choose_device(profile)
            except ValueError as err:
                results[name] = {"skipped": str(err)}
                continue
            start = time.perf_counter()
            outcome = run_search(model, profile, a, work_dir=Path(tmp) / name, calibration=calibration,
                                 windows=windows, seed=cfg.seed, tokenizer_from=model_dir)
            entry = {"seconds": time.perf_counter() - start, "device": outcome.device,
                     "reference": outcome.reference.to_json(), "candidates": len(outcome.archive),
                     "passed": sum(c.passed for c in outcome.archive.candidates),
                     "front": [outcome.archive.candidates[i].to_json() for i in outcome.archive.front(a.decision)],
                     "winner": None if outcome.winner is None else outcome.archive.candidates[outcome.winner].to_json()}
            if outcome.winner is None:
                from collections import Counter

                broken = Counter(r.split(" ")[0] for c in outcome.archive.candidates for r in c.reasons)
                entry["unmet"] = dict(broken)
            results[name] = entry

    print(f"# ADAS: input vs certified winner per target profile ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, preset {args.preset}, decision {cfg.adas.decision}, "
          f"{cfg.adas.generations}x{cfg.adas.population} candidates)\n")
    for name, r in results.items():
        if "skipped" in r:
            print(f"## {name}: skipped: {r['skipped']}\n")
            continue
        print(f"## {name} ({r['device']}, {r['candidates']} candidates, {r['passed']} passed, {r['seconds']:.0f} s)\n")
        if r["winner"] is None:
            print(f"No candidate met every requirement. Broken requirements (candidates): {r['unmet']}\n")
            continue
        ref, win = r["reference"], r["winner"]
        print(f"winner: {Recipe.from_json(win['recipe']).describe()} (origin {win['origin']}, generation "
              f"{win['generation']}); input: {Recipe.from_json(ref['recipe']).describe()}\n")
        print("| measure | input | winner | winner / input |\n|---|---|---|---|")
        for label, key in _ROWS:
            a_, b_ = _value(ref["metrics"], key), _value(win["metrics"], key)
            ratio = b_ / a_ if isinstance(a_, (int, float)) and isinstance(b_, (int, float)) and a_ else None
            print(f"| {label} | {_fmt(a_)} | {_fmt(b_)} | {_fmt(ratio)} |")
        print(f"\nPareto front over {', '.join(n for n, _ in OBJECTIVES[cfg.adas.decision])}:\n")
        print("| recipe | accuracy | call p95 ms | disk MiB | passed |\n|---|---|---|---|---|")
        for c in r["front"]:
            m = c["metrics"]
            print(f"| {Recipe.from_json(c['recipe']).describe()} | {_fmt(m.get('accuracy'))} | "
                  f"{_fmt(m.get('call_p95_ms'))} | {_fmt(_value(m, 'disk_bytes'))} | {c['passed']} |")
        print()
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
