"""Benchmark: phase 8's techniques on one model, measured side by side in one run.

For each strategy (pruning, quantization, distillation, hybrid, progressive) the compression
team runs on the same input model (a local Ray, the preset's ``compress:`` settings otherwise),
with the quality gate off (``min_retention`` 0, so every technique's retention is shown,
passing or not), and the table shows, vs the fp32 input: size ratio (fp32 bytes of the parameters / bytes of the
package's tensor file on disk), accuracy retention (held-out next-token accuracy), perplexity
ratio, and latency ratio (p50 of a forward pass, profiled by the team's profiler in the same
process as the input's). The quantization run adds one row per codec alone (every matrix in
that codec). The hybrid and progressive runs' Pareto fronts are printed in full. Then, per
weight matrix of the input model, VPTQ against round-to-nearest at no more bits per weight (codebooks counted):
relative Hessian-weighted error ``||(W - Q) X^T|| / ||W X^T||`` on calibration inputs.

The input model: ``--model DIR`` (an HF Cognate dir), else the tiny preset's phases 1-2 are run
first into a temporary folder (about 80 s on 2 cores).

With ``--bitnet`` the quantization strategy also runs on a BitNet-like copy of the model (every
linear layer but the LM head ternarised by absmean, one scale per row: a stand-in for a phase-4
model until phase 4 is built); the driver adds the ternary codec, and the row shows size vs the
fp32 bytes of that input and retention vs it, with the ternary codec alone below.

Usage: python benchmarks/compression.py [--model DIR] [--preset tiny] [--strategies hybrid,quantization]
       [--bitnet] [--set compress.KEY=VALUE ...] [--json]
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

STRATEGIES = ("pruning", "quantization", "distillation", "hybrid", "progressive")


def _tiny_model(root: Path, preset: str) -> Path:
    from coordinator.config import load_config
    from coordinator.pipeline import parse_selection, run_pipeline
    from coordinator.runfolder import RunFolder
    from coordinator.tracking import Tracker

    cfg, _ = load_config(preset=preset, overrides=["wandb.mode=disabled"])
    run = RunFolder(root / "phases12")
    plan = parse_selection(["cognate", "evomerge"])
    run.create(run_id="bench12", config=cfg.model_dump(mode="json"), seed=cfg.seed, plan=[s.name for s in plan])
    results = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "bench12"))
    return run.resolve(results[-1].model)


def _run_strategy(root: Path, model: Path, preset: str, strategy: str, overrides: list[str] = ()) -> dict:
    from coordinator.config import load_config
    from coordinator.pipeline import parse_selection, run_pipeline
    from coordinator.runfolder import RunFolder
    from coordinator.tracking import Tracker

    # The gate off (min_retention 0): the benchmark reports each technique's retention, passing or not.
    cfg, _ = load_config(preset=preset, overrides=["wandb.mode=disabled", *overrides, f"compress.strategy={strategy}",
                                                   "compress.min_retention=0.0"])
    run = RunFolder(root / strategy)
    plan = parse_selection(["compress"])
    run.create(run_id=f"bench-{strategy}", config=cfg.model_dump(mode="json"), seed=cfg.seed,
               plan=[s.name for s in plan])
    t0 = time.perf_counter()
    (result,) = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "b"), input_models=[model])
    wall = time.perf_counter() - t0
    if not result.success:
        return {"strategy": strategy, "error": result.error, "wall_s": wall}
    phase = run.phase_dir(8, "compress")
    return {"strategy": strategy, "wall_s": wall, "metrics": result.metrics, "degraded": result.degraded,
            "report": json.loads((phase / "compression_report.json").read_text()),
            "timings": json.loads((phase / "timings.json").read_text()),
            "pareto": json.loads((phase / "pareto.json").read_text())}


def _bitnet_model(model: Path, out: Path) -> Path:
    """A copy of ``model`` with its linear layers (not the LM head) ternarised in place."""
    from actors.io import load_hf, save_hf
    from phases.compression.ternary import ternarize_linears

    m = load_hf(model)
    ternarize_linears(m)
    save_hf(m, out, str(model))
    return out


def vptq_vs_rtn(model_dir: Path, preset: str) -> list[dict]:
    """Per weight matrix: VPTQ (v=4, 16 and 64 centroids) vs RTN at the largest bit width that
    stores no more bits, Hessian-weighted error on the corpus' calibration windows."""
    import torch

    from actors.io import load_hf
    from coordinator.config import load_config
    from phases.compression import rtn, vptq
    from phases.compression.analyze import weight_matrices
    from phases.compression.calibrate import linear_hessians
    from phases.data import load_corpus

    cfg, _ = load_config(preset=preset, overrides=["wandb.mode=disabled"])
    corpus = load_corpus(cfg.data, seed=cfg.seed)
    model = load_hf(model_dir)
    batches = [corpus.batch(i, 4, cfg.data.seq_len, cfg.seed)[:, :-1] for i in range(4)]
    hs = linear_hessians(model, batches, weight_matrices(model))
    rows = []
    for name, w in weight_matrices(model).items():
        if name not in hs:
            continue
        w = w.detach()
        h = hs[name]

        def err(q: torch.Tensor) -> float:
            d = (w - q).double()
            return float(torch.sqrt(torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w.double(), h, w.double())))

        for k in (16, 64):
            v = vptq.compress(w, hessian=h, vector_len=4, centroids=k)
            best = None
            for bits in (1, 2, 3, 4, 8):
                for group in (128, 64, 32, 16):
                    r = rtn.compress(w, bits=bits, group_size=group)
                    if r.bits_per_weight <= v.bits_per_weight and (best is None or err(r.decompress()) < best[1]):
                        best = (r, err(r.decompress()))
            rows.append({"matrix": name, "centroids": k, "vptq_bpw": v.bits_per_weight, "vptq_err": err(v.decompress()),
                         "rtn_bpw": best[0].bits_per_weight if best else None, "rtn_err": best[1] if best else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--bitnet", action="store_true", help="also the quantization strategy on a ternarised copy")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset value for every run, e.g. --set compress.sparsity=0.8")
    ap.add_argument("--no-vptq-table", action="store_true", help="skip the per-matrix VPTQ vs RTN comparison")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "preset": args.preset}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model.resolve() if args.model else _tiny_model(root, args.preset)
        out["model"] = str(args.model or f"the {args.preset} preset's EvoMerge model (phases 1-2, run here)")
        out["runs"] = [_run_strategy(root, model, args.preset, s, args.overrides)
                       for s in args.strategies.split(",") if s]
        if args.bitnet:
            bitnet = _bitnet_model(model, root / "bitnet-input")
            out["runs"].append({**_run_strategy(root / "bitnet", bitnet, args.preset, "quantization", args.overrides),
                                "label": "quantization (BitNet-like input)"})
        out["vptq_vs_rtn"] = [] if args.no_vptq_table else vptq_vs_rtn(model, args.preset)
    ray.shutdown()
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return

    print(f"Phase 8 on {out['model']}; {out['machine']}; preset {args.preset}")
    print(f"{'technique':<22} {'size x fp32':>11} {'retention':>10} {'ppl ratio':>10} {'latency x':>10} {'wall s':>7}")
    for r in out["runs"]:
        if "error" in r:
            print(f"{r['strategy']:<22} failed: {r['error']}")
            continue
        m = r["metrics"]
        print(f"{r.get('label', r['strategy']):<22} {m['compression/ratio_vs_fp32']:>11.2f} {m['compression/retention']:>10.4f} "
              f"{m['compression/perplexity_ratio']:>10.4f} {m['compression/latency_ratio'] or float('nan'):>10.2f} "
              f"{r['wall_s']:>7.1f}" + (f"  ({r['degraded']})" if r["degraded"] else ""))
        if r["strategy"] == "quantization" and "pareto" in r:
            for codec, row in sorted(r["pareto"]["uniform"].items()):
                lat = r["timings"]["profile"].get(f"uniform-{codec}", {}).get("latency_ratio")
                print(f"  {codec + ' alone':<20} {row['compression']:>11.2f} {row['retention']:>10.4f} "
                      f"{'':>10} {lat if lat is not None else float('nan'):>10.2f}")
    for r in out["runs"]:
        if r.get("strategy") in ("hybrid", "progressive") and "pareto" in r:
            print(f"\n{r['strategy']} Pareto front (size x fp32 by bits, retention):")
            for p in sorted(r["pareto"]["front"], key=lambda p: p["compression"]):
                mark = "  <- chosen" if p == r["pareto"]["chosen"] else ""
                print(f"  {p['compression']:8.2f}x  {p['retention']:.4f}{mark}")
    if not out["vptq_vs_rtn"]:
        return
    wins = sum(1 for row in out["vptq_vs_rtn"] if row["rtn_err"] is not None and row["vptq_err"] < row["rtn_err"])
    print(f"\nVPTQ vs RTN at no more bits per weight, per matrix ({wins}/{len(out['vptq_vs_rtn'])} VPTQ wins):")
    for row in out["vptq_vs_rtn"]:
        print(f"  {row['matrix']:<40} k={row['centroids']:<3} vptq {row['vptq_bpw']:.2f} bpw err {row['vptq_err']:.4f}"
              f" | rtn {row['rtn_bpw'] or float('nan'):.2f} bpw err {row['rtn_err'] or float('nan'):.4f}")


if __name__ == "__main__":
    main()
