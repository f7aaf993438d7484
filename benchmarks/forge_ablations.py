"""Benchmark: phase 5's features, each switched off against the same run with it on.

Runs the whole phase (``phases.forge.train.train_forge``) once per variant and seed, on the same
input model, corpus and step budget:

- ``all``: the Grokfast filter, curriculum, edge-of-chaos control, dream cycles and
  self-modeling all on;
- ``no-<feature>``: all on but that one;
- ``none``: all five off (plain AdamW training, warm-up then cosine decay, the tasks at the data
  section's ``max_operand``, fresh rows on every step);
- ``only-<feature>``: that one on, the rest off.

Without Grokfast no gradient filter runs (with it: EMA, in the acceleration stage under the
curriculum, after the warm-up without it); without the curriculum the schedule is linear
warm-up then cosine decay; without edge control the training tasks stay at the data section's
``max_operand``; without dream cycles every step trains on fresh rows; without self-modeling
there are no self-model heads or loss. Each feature
is measured twice, against the same runs with it off: ``all`` vs ``no-<feature>`` and
``only-<feature>`` vs ``none``.

Every other setting is the ``forge:`` section of ``--preset`` (default tiny), with ``--steps``
and dream cycles scaled to the budget (every ``steps // 6`` steps, ``--dream-steps`` long:
the reference's 1000/50 would never fire in a short run), no early stopping, and the last
step's weights measured (``restore_best`` off), so every variant gets the same budget. Each row gives, as mean and spread
over ``--seeds`` seeds (the run seed, which sets the data order and the task and replay draws):
held-out validation loss (text), held-out task accuracy (exact match on the corpus' fixed
held-out tasks, ``eval_tasks`` per kind), the success rate on training tasks, and wall time;
then each feature's paired difference, on minus off (mean over seeds, and in how many seeds it
helped). Lower val loss and higher task accuracy are better.

The input model: ``--model DIR`` (an HF causal LM dir, e.g. ``RUN/04_bitnet/models/bitnet`` of
the tiny run), or by default a new Cognate model of the preset's size with seeded weights (from
scratch, so the run measures learning rather than fine-tuning). Every number printed is measured
in this run.

Usage: python benchmarks/forge_ablations.py [--model DIR] [--preset tiny] [--steps 600] [--seeds 3]
       [--eval-tasks 64] [--variants all,no-curriculum,...] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_OFF = {"enabled": False}
_ON = {"enabled": True}
FEATURES = ("grokfast", "curriculum", "edge", "dream", "self_model")
VARIANTS = {
    "all": {f: _ON for f in FEATURES},
    **{f"no-{f.replace('_', '-')}": {**{g: _ON for g in FEATURES}, f: _OFF} for f in FEATURES},
    "none": {f: _OFF for f in FEATURES},
    **{f"only-{f.replace('_', '-')}": {**{g: _OFF for g in FEATURES}, f: _ON} for f in FEATURES},
}
# (feature, variant with it on, the same variant with it off)
PAIRS = [(f, "all", f"no-{f.replace('_', '-')}") for f in FEATURES] + \
    [(f, f"only-{f.replace('_', '-')}", "none") for f in FEATURES]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _fresh_model(cfg, corpus, seed: int, out: Path) -> Path:
    import torch

    from phases.cognate.modeling import CognateForCausalLM
    from phases.cognate.train import build_model_config, save_model_dir

    torch.manual_seed(seed)
    model = CognateForCausalLM(build_model_config(cfg.cognate, corpus.tokenizer, "memory"))
    return save_model_dir(model, corpus.tokenizer, out)


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f}±{sd:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="input HF causal LM dir (default: a fresh Cognate)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--dream-steps", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-tasks", type=int, default=64, help="held-out tasks per kind (the corpus holds 64)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    import torch

    from coordinator.config import load_config
    from phases.data import load_corpus
    from phases.forge.config import ForgeConfig
    from phases.forge.train import train_forge

    torch.set_num_threads(args.threads)
    cfg, _ = load_config(preset=args.preset)
    base = _merge(cfg.forge.model_dump(mode="json"), {
        "steps": args.steps, "eval_every": max(1, args.steps // 6), "patience": 0, "restore_best": False,
        "eval_tasks": args.eval_tasks,
        "checkpoint_every": args.steps, "dream": {"every": max(2, args.steps // 6), "steps": args.dream_steps}})
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for s in range(args.seeds):
            seed = cfg.seed + s
            corpus = load_corpus(cfg.data, seed)
            model = args.model or _fresh_model(cfg, corpus, seed, tmp / f"input-{s}")
            for name in names:
                section = ForgeConfig.model_validate(_merge(base, VARIANTS[name]))
                t0 = time.perf_counter()
                out = train_forge(model, section, corpus, seed=seed, work_dir=tmp / f"{name}-{s}" / "work",
                                  out_dir=tmp / f"{name}-{s}" / "out")
                m = out["metrics"]
                results[name].append({"seed": seed, "val_loss": m["forge/val_loss"],
                                      "task_accuracy": m.get("forge/task_accuracy"),
                                      "train_task_success": m.get("forge/train_task_success"),
                                      "difficulty_level": m["forge/difficulty_level"],
                                      "seconds": time.perf_counter() - t0})
                print(f"  seed {seed} {name:14s} val_loss {m['forge/val_loss']:.4f} "
                      f"task_acc {m.get('forge/task_accuracy', float('nan')):.4f} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)

    print(f"\nforge ablations: preset {args.preset}, {args.steps} steps, {args.seeds} seeds, "
          f"input {'--model ' + str(args.model) if args.model else 'fresh Cognate'}")
    print(f"{'variant':15s} {'val_loss':>16s} {'task_acc':>16s} {'train_task_succ':>16s} {'level':>6s} {'s/run':>7s}")
    for name in names:
        rows = results[name]
        print(f"{name:15s} {_stats([r['val_loss'] for r in rows]):>16s} "
              f"{_stats([r['task_accuracy'] for r in rows if r['task_accuracy'] is not None]):>16s} "
              f"{_stats([r['train_task_success'] for r in rows if r['train_task_success'] is not None]):>16s} "
              f"{statistics.mean(r['difficulty_level'] for r in rows):6.2f} "
              f"{statistics.mean(r['seconds'] for r in rows):7.1f}")
    print("\npaired, feature on minus off (val_loss < 0 or task_acc > 0: the feature helped):")
    for feature, on, off in PAIRS:
        if on not in results or off not in results:
            continue
        dv = [a["val_loss"] - b["val_loss"] for a, b in zip(results[on], results[off])]
        dt = [a["task_accuracy"] - b["task_accuracy"] for a, b in zip(results[on], results[off])
              if a["task_accuracy"] is not None and b["task_accuracy"] is not None]
        print(f"  {feature:11s} {on:16s} - {off:16s} d_val_loss {statistics.mean(dv):+.4f} "
              f"(helped in {sum(d < 0 for d in dv)}/{len(dv)} seeds)  d_task_acc "
              f"{statistics.mean(dt) if dt else float('nan'):+.4f} (helped in {sum(d > 0 for d in dt)}/{len(dt)})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
