"""Benchmark: the edge-of-chaos controller over a long phase-5 run, its level and the success rate.

Trains a new Cognate model of the preset's size from scratch (seeded weights) with phase 5
(``phases.forge.train.train_forge``), edge-of-chaos control on and every other feature as the
preset has it, for ``--steps`` steps with ``--task-fraction`` of each batch's rows generated
tasks, then prints, for every ``--window`` steps, the difficulty level the tasks were drawn at
(its largest operand) and the success rate on the training tasks (exact match of the answer,
read off the training step's own forward pass: what the controller sees), and whether that rate
was inside the controller's band (55-75% by default). Every number printed is measured in
this run.

Usage: python benchmarks/forge_edge.py [--preset tiny] [--steps 3000] [--task-fraction 0.5]
       [--window 100] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--task-fraction", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from coordinator.config import load_config
    from phases.cognate.modeling import CognateForCausalLM
    from phases.cognate.train import build_model_config, save_model_dir
    from phases.data import load_corpus
    from phases.forge.config import ForgeConfig
    from phases.forge.train import train_forge

    torch.set_num_threads(args.threads)
    cfg, _ = load_config(preset=args.preset)
    corpus = load_corpus(cfg.data, cfg.seed)
    section = ForgeConfig.model_validate({
        **cfg.forge.model_dump(mode="json"), "steps": args.steps, "eval_every": args.steps, "patience": 0,
        "edge": {**cfg.forge.edge.model_dump(mode="json"), "enabled": True},
        "data": {**cfg.forge.data.model_dump(mode="json"), "task_fraction": args.task_fraction}})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(cfg.seed)
        model = CognateForCausalLM(build_model_config(cfg.cognate, corpus.tokenizer, "memory"))
        model_dir = save_model_dir(model, corpus.tokenizer, tmp / "input")
        t0 = time.perf_counter()
        out = train_forge(model_dir, section, corpus, seed=cfg.seed, work_dir=tmp / "work", out_dir=tmp / "out")
        seconds = time.perf_counter() - t0

    fields = out["report"]["records"]["fields"]
    rows = out["report"]["records"]["rows"]
    level_i, tasks_i, solved_i = (fields.index(k) for k in ("difficulty_level", "tasks", "tasks_solved"))
    levels, low, high = section.edge.levels, section.edge.low, section.edge.high
    print(f"edge-of-chaos control, preset {args.preset}: {args.steps} steps from scratch, {args.task_fraction:g} of "
          f"the rows tasks, band {low:g}-{high:g}, levels (largest operand) {list(levels)}; {seconds:.0f} s")
    print(f"{'steps':>11s} {'levels':>8s} {'max operand':>11s} {'tasks':>6s} {'success':>8s}  in band")
    windows, in_band = [], 0
    for start in range(0, len(rows), args.window):
        chunk = rows[start:start + args.window]
        scored, solved = sum(r[tasks_i] for r in chunk), sum(r[solved_i] for r in chunk)
        lv = sorted({int(r[level_i]) for r in chunk})
        rate = solved / scored if scored else float("nan")
        inside = low <= rate <= high
        in_band += inside
        windows.append({"first_step": start + 1, "last_step": start + len(chunk), "levels": lv, "tasks": scored,
                        "success": rate, "in_band": inside})
        print(f"{start + 1:5d}-{start + len(chunk):5d} {','.join(map(str, lv)):>8s} "
              f"{','.join(str(levels[i]) for i in lv):>11s} {scored:6d} {rate:8.3f}  {'yes' if inside else 'no'}")
    m = out["metrics"]
    print(f"windows in band: {in_band}/{len(windows)}; final level {m['forge/difficulty_level']} "
          f"(largest operand {m['forge/max_operand']}); held-out val loss {m['forge/val_loss']:.4f}, "
          f"held-out task accuracy {m.get('forge/task_accuracy', float('nan')):.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "windows": windows,
                                         "metrics": m, "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
