"""Benchmark: merge throughput per method, ours (phases.evomerge.merge) vs mergekit, same inputs.

Both merge the same in-memory float32 state dicts (``--models`` models of ``--tensors`` tensors
of ``--dim`` x ``--dim``) through their in-memory APIs: ``phases.evomerge.merge`` and
``mergekit.merge_methods.merge_state_dicts``. Each row is the median of ``--repeats`` timed
merges after one warm-up, methods interleaved (ours, then mergekit, per repeat). Throughput is
MB/s of input parameters (all models) merged. Target from the issue: ours >= 1.0x mergekit.

Usage: python benchmarks/merge_ops.py [--json] [--quick] [--dim 1024] [--tensors 8] [--models 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.evomerge import merge  # noqa: E402

CASES = [  # method, base, parameters (mergekit's names and forms), models used
    ("linear", None, {"weight": [0.5, 0.3, 0.2]}, 3),
    ("task_arithmetic", 0, {"weight": [0.7, 0.4]}, 3),
    ("ties", 0, {"weight": [0.7, 0.4], "density": [0.5, 0.3]}, 3),
    ("dare_ties", 0, {"weight": [0.7, 0.4], "density": [0.5, 0.3]}, 3),
    ("dare_linear", 0, {"weight": [0.7, 0.4], "density": [0.5, 0.3]}, 3),
    ("slerp", 0, {"t": 0.3}, 2),
]


def state_dicts(n: int, tensors: int, dim: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for m in range(n):
        g = torch.Generator().manual_seed(m)
        out.append({f"layers.{i}.weight": torch.randn(dim, dim, generator=g) for i in range(tensors)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        args.dim, args.tensors, args.repeats = 256, 4, 3
    from mergekit.merge_methods import merge_state_dicts

    models = state_dicts(args.models, args.tensors, args.dim)
    rows = []
    for method, base, params, n in CASES:
        ms = models[:n]
        mbytes = sum(t.numel() * t.element_size() for sd in ms for t in sd.values()) / 1e6
        runs = {"ours": lambda: merge(method, ms, base=base, parameters=params, seed=0),
                "mergekit": lambda: merge_state_dicts(ms, method, parameters=params, base=base)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for name, fn in runs.items():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"method": method, "models": n, "input_MB": round(mbytes, 1),
                     "ours_MB_s": mbytes / med["ours"], "mergekit_MB_s": mbytes / med["mergekit"],
                     "ours_over_mergekit": med["mergekit"] / med["ours"]})
    meta = {"dim": args.dim, "tensors": args.tensors, "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
        return 0
    print(f"{args.tensors} tensors of {args.dim}x{args.dim} float32 per model; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'method':<16}{'models':>7}{'input MB':>10}{'ours MB/s':>11}{'mergekit MB/s':>15}{'ours/mergekit':>15}")
    for r in rows:
        print(f"{r['method']:<16}{r['models']:>7}{r['input_MB']:>10.1f}{r['ours_MB_s']:>11.0f}{r['mergekit_MB_s']:>15.0f}"
              f"{r['ours_over_mergekit']:>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
