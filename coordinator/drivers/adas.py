"""Phase 7, ADAS (Architecture Discovery And Search for deployment): the ADAS team (nine agents,
``actors/adas/``) on the runtime, and what the phase records.

The team's graph (``actors/adas/graph.py``) searches deployment recipes of the phase-6 model for
the configured target profile under its latency budgets and safety gates, and certifies the
winner. The phase's outputs: ``models/adas`` (the winner's architecture as an HF model dir, with
the input's tokenizer, tool registry and persona: phase 8's input), ``deployment/`` (the
winner's deployed artifact on its backend and precision) and ``certificate/`` (the compliance
certificate with its evidence files). When no candidate meets every requirement, the phase fails
naming the requirements no candidate met (``unmet.json`` stays in ``work/``).

Artifacts: ``adas_report.json`` (recipes, lineage, accuracy, bytes, FLOPs: functions of the
config and seed), the certificate. The timings and the verdicts taken on them go to
``timings.json`` (not hashed); ``pareto.json`` and ``latency.json`` feed the report's plots.
Metrics: ``adas/*`` (see :func:`_metrics`), including ``adas/health/*``, the team's health.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from coordinator.errors import PhaseError
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json

__all__ = ["run_adas"]

log = logging.getLogger("agentforge")

_MIB = 2 ** 20
_SHOWN = ("accuracy", "retention", "call_p50_ms", "call_p95_ms", "call_p99_ms", "token_p95_ms", "token_p99_ms",
          "memory_bytes", "disk_bytes", "parity", "flops_per_token")


def _describe(recipe: dict[str, Any]) -> str:
    from phases.adas.recipes import Recipe

    return Recipe.from_json(recipe).describe()


def _tables(out: dict[str, Any], archive: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``candidates`` (every candidate: recipe, lineage, measurements, front, verdict),
    ``requirements`` (the certificate's rows) and ``input_vs_winner``."""
    front = set(archive["front"])
    rows = []
    for i, c in enumerate(archive["archive"]):
        m = c["metrics"]
        rows.append({"candidate": c["key"], "recipe": _describe(c["recipe"]), "generation": c["generation"],
                     "origin": c["origin"], "parents": ",".join(c["parents"]),
                     **{k: (None if m.get(k) is None else float(m[k])) for k in _SHOWN},
                     "on_front": i in front, "passed": bool(c["passed"]), "winner": i == archive["winner"],
                     "reasons": "; ".join(c["reasons"])})
    tables: dict[str, list[dict[str, Any]]] = {"candidates": rows}
    cert = out["certify"]
    if cert.get("requirements"):
        tables["requirements"] = [{"requirement": r["description"], "limit": str(r["limit"]),
                                   "measured": str(r["measured"]), "passed": bool(r["passed"]),
                                   "evidence": r["evidence"]} for r in cert["requirements"]]
    if archive["winner"] is not None:
        ref, win = out["safety-0"]["reference"]["metrics"], archive["archive"][archive["winner"]]["metrics"]
        tables["input_vs_winner"] = [{"measure": k, "input": None if ref.get(k) is None else float(ref[k]),
                                      "winner": None if win.get(k) is None else float(win[k])}
                                     for k in _SHOWN if k != "retention"]
    return tables


def _metrics(out: dict[str, Any], archive: dict[str, Any]) -> dict[str, Any]:
    cands = archive["archive"]
    ref = out["safety-0"]["reference"]["metrics"]
    m: dict[str, Any] = {"adas/candidates": len(cands), "adas/passed": sum(1 for c in cands if c["passed"]),
                         "adas/failed_to_measure": sum(1 for c in cands if c["error"]),
                         "adas/front_size": len(archive["front"]), "adas/front_passed": len(archive["front_passed"]),
                         "adas/certified": bool(out["certify"]["passed"])}
    for k in _SHOWN:
        if ref.get(k) is not None and k != "retention":
            m[f"adas/input/{k}"] = ref[k]
    if archive["winner"] is not None:
        win = cands[archive["winner"]]["metrics"]
        for k in _SHOWN:
            if win.get(k) is not None:
                m[f"adas/winner/{k}"] = win[k]
        m["adas/speedup_p95"] = ref["call_p95_ms"] / win["call_p95_ms"]
        m["adas/size_ratio"] = ref["disk_bytes"] / win["disk_bytes"]
        if ref.get("memory_bytes") and win.get("memory_bytes"):
            m["adas/memory_ratio"] = ref["memory_bytes"] / win["memory_bytes"]
        dep = out["deploy"]
        m["adas/reload_equals_measured"] = dep["reload_equals_measured"]
        m["adas/reload_parity"] = dep["reload_parity"]["max_rel_diff"]
    return m


def _plots(ctx: PhaseContext, out: dict[str, Any], archive: dict[str, Any]) -> None:
    """``pareto.json`` (accuracy vs p95 latency: every candidate, the front, the input, the
    winner) and ``latency.json`` (the raw call latencies of the input and the front)."""
    import json
    from pathlib import Path

    def point(c: dict[str, Any]) -> dict[str, Any]:
        return {"call_p95_ms": c["metrics"]["call_p95_ms"], "accuracy": c["metrics"]["accuracy"],
                "label": c["key"][:6]}

    ok = [c for c in archive["archive"] if not c["error"]]
    ref = out["safety-0"]["reference"]
    data = {"x": "call_p95_ms", "y": "accuracy", "xlabel": "p95 latency of one call (ms)",
            "title": f"adas ({out['plan']['profile']}): candidates and Pareto front",
            "points": [point(c) for c in ok], "front": [point(archive["archive"][i]) for i in archive["front"]],
            "uniform": {"input": point(ref)}, "xscale": "linear",
            "chosen": point(archive["archive"][archive["winner"]]) if archive["winner"] is not None else None}
    atomic_write_json(ctx.phase_dir / "pareto.json", data)
    samples = {"input": json.loads(Path(ref["evidence"]).read_text())["call_samples_ms"]}
    from actors.adas.roles import evidence_file

    for i in archive["front"]:
        c = archive["archive"][i]
        path = evidence_file({"work": str(ctx.work_dir / "adas")}, c["key"])
        samples[_describe(c["recipe"])] = json.loads(path.read_text())["call_samples_ms"]
    atomic_write_json(ctx.phase_dir / "latency.json", {"unit": "ms", "what": "one call", "samples": samples})


@register_phase("adas", number=7, title="ADAS: deployment architecture search", consumes="model")
def run_adas(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    from actors.adas.graph import adas_team
    from actors.adas.roles import last_archive
    from coordinator.drivers.teams import check_fits, run_team, team_metrics

    from phases.adas.inline import choose_device

    (model_dir,) = inputs.models
    cfg = ctx.config.adas
    try:  # before any agent starts
        choose_device(cfg.target())
    except ValueError as err:
        raise PhaseError("adas", f"profile {cfg.profile!r} cannot run here: {err}") from None
    out_dir = ctx.phase_dir / "models" / "adas"
    common = {"input": str(model_dir), "work": str(ctx.work_dir / "adas"), "out": str(out_dir),
              "deploy": str(ctx.phase_dir / "deployment"), "certificate": str(ctx.phase_dir / "certificate"),
              "phase_dir": str(ctx.phase_dir), "seed": ctx.seed, "data": ctx.config.data.model_dump(mode="json")}
    spec = adas_team(cfg, common)
    check_fits(spec, "adas")
    ctx.progress("tasks", 0, len(spec.tasks))
    result = run_team(ctx, spec)
    out = result.outputs
    archive = out[last_archive(out)]
    _plots(ctx, out, archive)
    cert = out["certify"]
    if archive["winner"] is None:
        unmet = cert["unmet"]
        shutil.copy2(cert["file"], ctx.phase_dir / "unmet.json")
        rows = "; ".join(f"{name}: {t['met']}/{t['measured']} met ({t['requirement']}; best "
                         f"{t['best']:.4g})" if isinstance(t["best"], (int, float)) else
                         f"{name}: {t['met']}/{t['measured']} met ({t['requirement']})"
                         for name, t in unmet["requirements"].items() if t["met"] < t["measured"])
        raise PhaseError("adas", f"no candidate of {unmet['candidates']} met every requirement of profile "
                                 f"{cfg.profile!r}; none met: {', '.join(unmet['none_met']) or '-'}. {rows}")
    if not out["deploy"]["reload_equals_measured"]:
        raise PhaseError("adas", "the deployed artifact, reloaded, does not reproduce the measured artifact's logits")
    metrics = _metrics(out, archive)
    metrics.update(team_metrics("adas", result, spec.name))
    report = ctx.phase_dir / "adas_report.json"
    shutil.copy2(out["report"]["report"], report)
    shutil.copy2(out["report"]["timings"], ctx.phase_dir / "timings.json")  # measured: not an artifact
    win = archive["archive"][archive["winner"]]
    log.info("adas (%s): winner %s, p95 %.2f ms vs %.2f ms input, %.2fx smaller on disk, retention %.3f",
             cfg.profile, _describe(win["recipe"]), win["metrics"]["call_p95_ms"],
             metrics["adas/input/call_p95_ms"], metrics["adas/size_ratio"], win["metrics"]["retention"])
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=metrics,
                       artifacts={"report": report, "certificate": ctx.phase_dir / "certificate" / "certificate.json"},
                       tables=_tables(out, archive))
