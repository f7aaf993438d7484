"""Phase 8, final compression: the compression team (nine agents, ``actors/compression/``) on
the runtime, and what the phase records.

The team's graph (``actors/compression/graph.py``) runs under the coordinator with its recovery
policies and the pipeline's ``chaos`` section. The phase's model is the package the deployment
packager wrote (``models/compressed``): the compressed representation itself (packed codes,
codebooks, seeds, sparse masks) and a loader (``phases.compression.package.load_model``); its
size is bytes on disk. The input model is never passed through: if no recipe passes the quality
gate, the phase fails with the gate's reasons (the report and search stay in ``work/``).

Artifacts: ``compression_report.json`` (every stage, codec, Pareto point, validation, export),
``search.json`` (every recipe tried), ``pareto.json`` (the points the report plots): functions
of the config and seed. Measured timings (the profiler's, seconds per codec) go to
``timings.json`` beside them and into the metrics, never into a hashed artifact.
Metrics: ``compression/*``, measured: ``ratio_vs_fp32`` (fp32 bytes of the input's parameters /
bytes on disk of the package's tensors file), ``retention`` (held-out next-token accuracy vs the
input), ``perplexity_ratio``, latency and memory ratios vs the input, and per codec the same.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from coordinator.errors import PhaseError
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json

__all__ = ["run_compress"]

log = logging.getLogger("agentforge")


def _metrics(search: dict[str, Any], val: dict[str, Any], pkg: dict[str, Any], prof: dict[str, Any],
             quant: dict[str, dict[str, Any]], fp32_bytes: int) -> dict[str, Any]:
    chosen = search["chosen"]
    m: dict[str, Any] = {
        "compression/ratio_vs_fp32": fp32_bytes / pkg["tensor_bytes"],
        "compression/ratio_vs_fp32_with_metadata": fp32_bytes / pkg["bytes_on_disk"],
        "compression/bits_per_param": 8 * pkg["tensor_bytes"] / (fp32_bytes / 4),
        "compression/bytes_on_disk": pkg["bytes_on_disk"],
        "compression/input_fp32_bytes": fp32_bytes,
        "compression/retention": val["retention"],
        "compression/perplexity_ratio": val["perplexity_ratio"],
        "compression/top1_agreement": val["parity"]["top1_agreement"],
        "compression/gate_passed": val["passed"],
        "compression/search_retention": chosen["metrics"]["retention"],
        "compression/search_ratio": chosen["metrics"]["compression"],
        "compression/pareto_points": len(search["front"]),
        "compression/trials": search["trials"],
        "compression/latency_ratio": prof["compressed"].get("latency_ratio"),
        "compression/memory_ratio": prof["compressed"].get("memory_ratio"),
        "compression/latency_p50_ms": prof["compressed"]["latency_ms_p50"],
        "compression/latency_p95_ms": prof["compressed"]["latency_ms_p95"],
    }
    if val.get("task_retention") is not None:
        m["compression/task_retention"] = val["task_retention"]
    for codec, out in quant.items():
        uniform = search["uniform"].get(out["codec"])
        key = f"compression/{codec}"
        m[f"{key}/bits"] = out["bits"]
        m[f"{key}/seconds"] = out["seconds"]
        if uniform:
            m[f"{key}/ratio_vs_fp32"] = uniform["metrics"]["compression"]
            m[f"{key}/retention"] = uniform["metrics"]["retention"]
        p = prof.get(f"uniform-{out['codec']}")
        if p:
            m[f"{key}/latency_ratio"] = p.get("latency_ratio")
        if out.get("fallback_from"):
            m[f"{key}/fell_back_to"] = out["codec"]
    if "onnx" in pkg:
        m["compression/onnx_max_abs_diff"] = pkg["onnx"]["parity"]["max_abs_diff"]
        m["compression/onnx_bytes"] = pkg["onnx"]["bytes"]
        m["compression/onnx_int8_bytes"] = pkg["onnx"]["int8_bytes"]
    return m


def with_ternary_codec(cfg: Any, model_dir: Path) -> Any:
    """``cfg`` with the ``ternary`` codec first in ``codecs`` when the input is a BitNet
    (phase-4) model: at least half its weight matrices ternary row by row (its embeddings stay
    floating point). Those matrices are then stored losslessly at about 1.6 bits per weight,
    and the recipe search weighs ternary against the other codecs per matrix."""
    from safetensors.torch import load_file

    from phases.compression.ternary import ternary_share

    if "ternary" in cfg.codecs or "quantize" not in cfg.stages:
        return cfg
    state: dict[str, Any] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(f))
    share = ternary_share(state, min_weights=cfg.min_weights)
    if share < 0.5:
        return cfg
    log.info("compress: %.0f%% of the input's weight matrices are ternary (a BitNet model): codec 'ternary' added",
             100 * share)
    return cfg.model_copy(update={"codecs": ("ternary", *cfg.codecs)})


@register_phase("compress", number=8, title="Final compression", consumes="model")
def run_compress(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    from actors.compression.graph import compression_team
    from coordinator.drivers.teams import check_fits, run_team, team_metrics

    (model_dir,) = inputs.models
    cfg = with_ternary_codec(ctx.config.compress, model_dir)
    out_dir = ctx.phase_dir / "models" / "compressed"
    work = ctx.work_dir / "compress"
    common = {"input": str(model_dir), "work": str(work), "out": str(out_dir), "phase_dir": str(ctx.phase_dir),
              "seed": ctx.seed,
              "data": ctx.config.data.model_dump(mode="json"),
              "eval": {"batch_size": cfg.eval_batch_size, "batches": cfg.eval_batches, "tasks": cfg.eval_tasks}}
    spec = compression_team(cfg, common)
    check_fits(spec, "compress")
    ctx.progress("tasks", 0, len(spec.tasks))
    result = run_team(ctx, spec)
    out = result.outputs
    search, val, pkg, prof = out["search"], out["validate"], out["package"], out["profile"]
    quant = {k.removeprefix("quantize-"): v for k, v in out.items() if k.startswith("quantize-")}
    if not val["passed"]:
        raise PhaseError("compress", "no compressed model passed the quality gate: " + "; ".join(val["reasons"]))
    if not pkg["reload_equals_candidate"]:
        raise PhaseError("compress", "the package, reloaded, does not reproduce the validated model's logits")

    fp32_bytes = 4 * out["analyze"]["params"]
    pkg = {**pkg, "tensor_bytes": (out_dir / "compressed.safetensors").stat().st_size}
    metrics = _metrics(search, val, pkg, prof, quant, fp32_bytes)
    metrics.update(team_metrics("compression", result, spec.name))
    report = ctx.phase_dir / "compression_report.json"
    shutil.copy2(out["report"]["report"], report)
    shutil.copy2(out["report"]["timings"], ctx.phase_dir / "timings.json")  # measured: not an artifact
    search_copy = ctx.phase_dir / "search.json"
    shutil.copy2(search["search"], search_copy)
    pareto = ctx.phase_dir / "pareto.json"
    atomic_write_json(pareto, {"x": "compression", "y": "retention", "chosen": search["chosen"]["metrics"],
                               "front": [t["metrics"] for t in search["front"]],
                               "uniform": {c: t["metrics"] for c, t in search["uniform"].items()}})
    degraded = None
    fell = [k for k, v in quant.items() if v.get("fallback_from")]
    if fell:
        degraded = f"{', '.join(fell)} fell back to int8 (SeedLM over its seedlm_max_seconds budget)"
    log.info("compress: %.1fx smaller than fp32 on disk at %.3f retention (%s)", metrics["compression/ratio_vs_fp32"],
             metrics["compression/retention"], cfg.strategy)
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=metrics,
                       artifacts={"report": report, "search": search_copy, "pareto": pareto}, degraded=degraded)
