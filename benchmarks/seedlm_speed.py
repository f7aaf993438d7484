"""Benchmark: SeedLM compression speed, the previous dense search vs the current one, same run.

Both search every one of the 2^K - 1 seeds of every block for the lowest float64 reconstruction
error (lowest seed on ties) and must return the same seeds, exponents and mantissas (checked;
where they differ, the two seeds' errors, computed the old way, must agree within 1e-14 ||w||^2:
ties that the two float64 summation orders break differently, e.g. on tiny blocks).

- old: the previous ``phases.compression.seedlm.compress``, kept here as the baseline: per
  chunk of 32 blocks, ``t`` for every seed, quantised, the (B, S, C) reconstruction and its error;
- new: ``phases.compression.seedlm.compress``: a float32 least-squares screen of every seed
  (a lower bound of its error), then the exact float64 error of the few seeds that can win.

The LFSR bases, pseudo-inverses and screens are built (cached) before timing; that one-off
set-up is shown apart. Times are wall seconds; "new" is the median of ``--repeats`` runs taken
before and after the (single, slow) old run, so both see the same machine load. Gaussian
weights, ``--scale`` their standard deviation.

Usage: python benchmarks/seedlm_speed.py [--json] [--quick] [--sizes 64x256,128x512] [--block 8]
       [--latent 3] [--seed-bits 16] [--scale 1.0] [--repeats 3] [--no-old]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.compression import seedlm


def _old_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    peak = t.abs().amax(dim=-1).clamp_min(1e-30)
    e = torch.ceil(torch.log2(peak / 7.5)).clamp(-8, 7)
    q = torch.round(t / torch.exp2(e)[..., None]).clamp(-8, 7)
    return q, e


def old_compress(weight: torch.Tensor, *, block: int = 8, latent: int = 3, seed_bits: int = 16,
                 chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The previous search, verbatim but for returning (seeds, exponents, mantissas)."""
    u, u_pinv = seedlm._bases(block, latent, seed_bits)
    flat = weight.detach().reshape(-1).double().cpu()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    seeds, exps, mants = [], [], []
    for start in range(0, len(blocks), chunk):
        w = blocks[start:start + chunk]  # (B, C)
        t = torch.einsum("spc,bc->bsp", u_pinv, w)  # (B, S, P)
        q, e = _old_quantize(t)
        recon = torch.einsum("scp,bsp->bsc", u, q * torch.exp2(e)[..., None])  # (B, S, C)
        err = ((recon - w[:, None, :]) ** 2).sum(-1)  # (B, S)
        best = err.argmin(dim=1)
        rows = torch.arange(len(w))
        seeds.append(best + 1)
        exps.append(e[rows, best].to(torch.int8))
        mants.append(q[rows, best].to(torch.int8))
    return torch.cat(seeds).long(), torch.cat(exps), torch.cat(mants)


def _worst_excess(weight: torch.Tensor, old_seeds: torch.Tensor, new_seeds: torch.Tensor, rows: torch.Tensor, *,
                  block: int, latent: int, seed_bits: int) -> float:
    """Where the two searches chose differently: the most by which the new seed's error exceeds
    the old seed's, both computed the old way, over ``||w||^2`` (0.0 if they never differ). Values
    near 1e-16 are ties that float64 rounding orders differently; the new search gives equal
    errors (within 1e-14 ||w||^2) to the lowest seed."""
    u, u_pinv = seedlm._bases(block, latent, seed_bits)
    flat = weight.detach().reshape(-1).double()
    blocks = torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).reshape(-1, block)
    worst = 0.0
    for i in rows.tolist():
        w = blocks[i]
        pair = torch.stack([old_seeds[i], new_seeds[i]]) - 1
        q, e = _old_quantize(torch.einsum("spc,c->sp", u_pinv[pair], w))
        recon = torch.einsum("scp,sp->sc", u[pair], q * torch.exp2(e)[:, None])
        err = ((recon - w) ** 2).sum(-1)
        worst = max(worst, float((err[1] - err[0]) / (w * w).sum()))
    return worst


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="64x64 only, one repeat")
    p.add_argument("--sizes", default="64x256", help="comma-separated ROWSxCOLS")
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--latent", type=int, default=3)
    p.add_argument("--seed-bits", type=int, default=16)
    p.add_argument("--scale", type=float, default=1.0, help="standard deviation of the weights")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-old", action="store_true", help="time the new search only")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats = "64x64", 1
    cfg = {"block": args.block, "latent": args.latent, "seed_bits": args.seed_bits}
    setup_s, _ = _timed(lambda: seedlm.compress(torch.ones(args.block), **cfg))  # builds every cache
    rows = []
    for size in args.sizes.split(","):
        shape = tuple(int(v) for v in size.lower().split("x"))
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * args.scale
        run_new = functools.partial(seedlm.compress, w, **cfg)
        new_s = []
        for _ in range((args.repeats + 1) // 2):
            dt, new = _timed(run_new)
            new_s.append(dt)
        row = {"shape": size, "weights": w.numel(), "blocks": -(-w.numel() // args.block)}
        if not args.no_old:
            old_t, (seeds, exps, mants) = _timed(functools.partial(old_compress, w, **cfg))
            row["old_s"] = old_t
            same = (seeds == new.seeds) & (exps == new.exponents) & (mants == new.mantissas).all(dim=1)
            row["same_result"] = bool(same.all())
            row["blocks_differing"] = int((~same).sum())
            row["worst_excess"] = _worst_excess(w, seeds, new.seeds, (~same).nonzero()[:, 0], **cfg)
        for _ in range(args.repeats // 2):
            dt, _ = _timed(run_new)
            new_s.append(dt)
        row["new_s"] = statistics.median(new_s)
        row["new_runs_s"] = new_s
        row["rel_error"] = float((new.decompress() - w).norm() / w.norm())
        if "old_s" in row:
            row["speedup"] = row["old_s"] / row["new_s"]
        rows.append(row)
    meta = {**cfg, "scale": args.scale, "setup_s": setup_s, "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
        return 0
    print(f"SeedLM (C, P, K) = ({args.block}, {args.latent}, {args.seed_bits}), Gaussian weights, std {args.scale}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; one-off set-up {setup_s:.2f} s; "
          f"new = median of {len(new_s)}")
    print(f"{'shape':<12}{'weights':>9}{'old s':>9}{'new s':>9}{'old/new':>9}{'old w/s':>10}{'new w/s':>10}"
          f"{'rel.err':>9}  same seeds, exponents, mantissas")
    for r in rows:
        old = r.get("old_s")
        old_s, ratio, old_ws = (f"{old:.2f}", f"{r['speedup']:.1f}x", f"{r['weights'] / old:.0f}") if old else ("-",) * 3
        same = "-" if not old else "yes" if r["same_result"] else (
            f"{r['blocks'] - r['blocks_differing']} of {r['blocks']} blocks; the rest are ties (new seed's error "
            f"exceeds the old one's by {r['worst_excess']:.1e} ||w||^2 at most)")
        print(f"{r['shape']:<12}{r['weights']:>9}{old_s:>9}{r['new_s']:>9.3f}{ratio:>9}{old_ws:>10}"
              f"{r['weights'] / r['new_s']:>10.0f}{r['rel_error']:>9.3f}  {same}")
    return 0 if all(r.get("worst_excess", 0.0) <= 1e-14 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
