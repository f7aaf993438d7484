"""Phase 6, tool and persona baking: the baking team (nine agents, ``actors/baking/``) on the
runtime, and what the phase records.

The team's graph (``actors/baking/graph.py``) runs under the coordinator with its recovery
policies and the pipeline's ``chaos`` section. The phase's model is the deployment preparer's
package (``models/baked``): the baked model with its tokenizer, the tool registry and the baked
persona. If the baked model fails the quality gate (perplexity rose too much, tool-call accuracy
fell), the phase fails with the gate's reasons; the team's work stays in ``work/``.

Artifacts: ``baking_report.json`` (questions, Toolformer's data step, both fine-tunes, the
before/after evaluations, the persona's KL, the gate): a function of the config and seed.
Measured timings and the decisions taken on them (hardware target, graph rewrites, decoders,
profiles) go to ``timings.json`` and ``deployment.json`` beside it, never into a hashed artifact.
Metrics: ``baking/*`` (see :func:`_metrics`), including ``baking/health/*``, the team's health.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from coordinator.errors import PhaseError
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase

__all__ = ["run_baking"]

log = logging.getLogger("agentforge")


_REWRITES = ("fuse_qkv", "fold_norms", "all")


def _tables(out: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``before_after`` (each measure on the input and the baked model) and ``optimisations``
    (each optimiser's measured effect, whether it was applied and why)."""
    before, after, persona = out["validate-before"], out["validate-after"], out["persona-bake"]
    rows = [{"measure": name, "before": before["tools"][key], "after": after["tools"][key]}
            for name, key in (("tool-call accuracy", "tool_call_accuracy"), ("task accuracy", "task_accuracy"),
                              ("tool choice accuracy", "tool_choice_accuracy"),
                              ("tool calls per prompt", "calls_per_prompt"))]
    rows.append({"measure": "held-out perplexity", "before": before["perplexity"], "after": after["perplexity"]})
    rows.append({"measure": "persona KL(prompted, unprompted)", "before": persona["kl_before"],
                 "after": persona["kl_after"]})
    for trait, v in after["traits"].items():
        rows.append({"measure": f"trait score: {trait} (prompted {before['traits_prompted'][trait]:.3f})",
                     "before": before["traits"][trait], "after": v})
    target, memory, graph, acc = (out[k] for k in ("target", "memory", "graph", "accelerate"))
    # every cell of a column one type (W&B tables insist): effects and reasons are text
    opt = [{"optimisation": f"hardware: dtype {target['dtype']}, {target['num_threads']} threads",
            "effect": f"{target['dtype_reason']}; {target['threads_reason']}", "applied": True,
            "reason": "the fastest candidate measured on this machine"}]
    ckpt = memory["checkpointing"]
    opt.append({"optimisation": "activation checkpointing (training)",
                "effect": f"activations {ckpt['reduction']:.2f}x smaller, step {ckpt['slowdown']:.2f}x slower",
                "applied": memory["checkpointing_applied"], "reason": ckpt["reason"]})
    tying = memory["weight_tying"]
    rise = tying.get("relative_loss_increase")
    opt.append({"optimisation": "weight tying",
                "effect": f"held-out loss {rise:+.2%}, {tying['bytes_saved']} bytes saved" if rise is not None
                else "none", "applied": tying["applied"], "reason": tying["reason"]})
    opt.append({"optimisation": f"storage dtype {memory['dtype']['chosen']} (deployment.json; the package keeps "
                                f"float32 for phase 8)", "effect": memory["dtype"]["reason"],
                "applied": memory["dtype"]["applied"], "reason": memory["dtype"]["reason"]})
    for name in _REWRITES:
        if name in graph:
            g = graph[name]
            opt.append({"optimisation": f"graph: {name}",
                        "effect": f"{g['speedup']:.3f}x, max abs logit diff {g['max_abs_diff']:.2g}",
                        "applied": g["rewrites"] == graph["chosen"], "reason": g["reason"]})
    for name, key in (("batched generation", "batching"), ("KV cache", "kv_cache"), ("torch.compile", "compile")):
        e = acc[key]
        effect = f"{e['speedup']:.3f}x" if "speedup" in e else "not measured"
        if e.get("compile_s") is not None:
            effect += f" after {e['compile_s']:.1f} s of compiling"
        opt.append({"optimisation": name, "effect": effect, "applied": e["applied"], "reason": e["reason"]})
    return {"before_after": rows, "optimisations": opt}


def _tool_metrics(prefix: str, tools: dict[str, Any]) -> dict[str, Any]:
    m = {f"{prefix}/tool_call_accuracy": tools["tool_call_accuracy"], f"{prefix}/task_accuracy": tools["task_accuracy"],
         f"{prefix}/tool_choice_accuracy": tools["tool_choice_accuracy"],
         f"{prefix}/calls_per_prompt": tools["calls_per_prompt"]}
    for tool, t in tools.get("per_tool", {}).items():
        m[f"{prefix}/{tool}/tool_call_accuracy"] = t["tool_call_accuracy"]
        m[f"{prefix}/{tool}/task_accuracy"] = t["task_accuracy"]
        m[f"{prefix}/{tool}/tool_choice_accuracy"] = t["tool_choice_accuracy"]
    return m


def _metrics(out: dict[str, Any]) -> dict[str, Any]:
    before, after, persona, data = out["validate-before"], out["validate-after"], out["persona-bake"], out["tool-data"]
    m: dict[str, Any] = {
        **_tool_metrics("baking/before", before["tools"]), **_tool_metrics("baking/after", after["tools"]),
        "baking/tool_call_gain": after["tool_call_gain"],
        "baking/task_accuracy_gain": after["tools"]["task_accuracy"] - before["tools"]["task_accuracy"],
        "baking/tool_data/candidates": data["candidates"], "baking/tool_data/kept": data["kept"],
        "baking/tool_data/errors": data["errors"], "baking/tool_data/kept_by_input": data["kept_by_input"],
        "baking/tool_bake/loss_first": out["tool-bake"]["loss_first"],
        "baking/tool_bake/loss_last": out["tool-bake"]["loss_last"],
        "baking/persona/kl_before": persona["kl_before"], "baking/persona/kl_after": persona["kl_after"],
        "baking/persona/kl_reduction": persona["kl_reduction"],
        "baking/perplexity_before": before["perplexity"], "baking/perplexity_after": after["perplexity"],
        "baking/perplexity_ratio": after["perplexity_ratio"], "baking/gate_passed": after["passed"],
    }
    for tool, n in data["kept_by_tool"].items():
        m[f"baking/tool_data/kept/{tool}"] = n
    for trait, v in after["traits"].items():
        m[f"baking/traits/{trait}/before"] = before["traits"][trait]
        m[f"baking/traits/{trait}/prompted"] = before["traits_prompted"][trait]
        m[f"baking/traits/{trait}/after"] = v
        if after["traits_gap_closed"][trait] is not None:
            m[f"baking/traits/{trait}/gap_closed"] = after["traits_gap_closed"][trait]
    target, memory, graph, acc, prof = (out[k] for k in ("target", "memory", "graph", "accelerate", "profile"))
    ckpt = memory["checkpointing"]
    m["baking/target/threads"] = target["num_threads"]
    m["baking/memory/activation_mb"] = ckpt["activation_bytes_without"] / 2 ** 20
    m["baking/memory/activation_reduction"] = ckpt["reduction"]
    m["baking/memory/checkpointing_slowdown"] = ckpt["slowdown"]
    m["baking/memory/checkpointing_applied"] = memory["checkpointing_applied"]
    m["baking/memory/tying_applied"] = memory["weight_tying"]["applied"]
    for name in _REWRITES:
        if name in graph:
            m[f"baking/graph/{name}/speedup"] = graph[name]["speedup"]
            m[f"baking/graph/{name}/applied"] = graph[name]["applied"]
    m["baking/graph/rewrites_applied"] = len(graph["chosen"])
    m["baking/accelerate/batched_speedup"] = acc["batching"]["speedup"]
    m["baking/accelerate/batched_applied"] = acc["batching"]["applied"]
    if acc["compile"].get("available"):
        m["baking/accelerate/compile_speedup"] = acc["compile"]["speedup"]
        m["baking/accelerate/compile_seconds"] = acc["compile"]["compile_s"]
    m["baking/accelerate/compile_applied"] = acc["compile"]["applied"]
    for name in ("baked", "optimised"):
        m[f"baking/profile/{name}/latency_ratio"] = prof[name]["latency_ratio"]
        m[f"baking/profile/{name}/latency_ms_p50"] = prof[name]["latency_ms_p50"]
    return m


@register_phase("baking", number=6, title="Tool and persona baking", consumes="model")
def run_baking(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    from actors.baking.graph import baking_team
    from coordinator.drivers.teams import check_fits, run_team, team_metrics

    (model_dir,) = inputs.models
    cfg = ctx.config.baking
    out_dir = ctx.phase_dir / "models" / "baked"
    common = {"input": str(model_dir), "work": str(ctx.work_dir / "baking"), "out": str(out_dir),
              "phase_dir": str(ctx.phase_dir), "seed": ctx.seed, "data": ctx.config.data.model_dump(mode="json"),
              "eval": {"batch_size": cfg.eval_batch_size, "batches": cfg.eval_batches}}
    spec = baking_team(cfg, common)
    check_fits(spec, "baking")
    ctx.progress("tasks", 0, len(spec.tasks))
    result = run_team(ctx, spec)
    out = result.outputs
    after = out["validate-after"]
    if not after["passed"]:
        raise PhaseError("baking", "the baked model failed the quality gate: " + "; ".join(after["reasons"]))
    metrics = _metrics(out)
    metrics.update(team_metrics("baking", result, spec.name))
    report = ctx.phase_dir / "baking_report.json"
    shutil.copy2(out["report"]["report"], report)
    shutil.copy2(out["report"]["timings"], ctx.phase_dir / "timings.json")  # measured: not an artifact
    shutil.copy2(out["package"]["deployment"], ctx.phase_dir / "deployment.json")  # timing-based choices
    degraded = None
    fell = [k for k in ("graph", "accelerate") if out[k].get("fell_back")]
    if fell:
        degraded = f"{', '.join(fell)} fell back to measuring without the optional optimisations"
    log.info("baking: tool-call accuracy %.2f -> %.2f, task accuracy %.2f -> %.2f, persona KL %.3f -> %.3f "
             "(%.1fx)", metrics["baking/before/tool_call_accuracy"], metrics["baking/after/tool_call_accuracy"],
             metrics["baking/before/task_accuracy"], metrics["baking/after/task_accuracy"],
             metrics["baking/persona/kl_before"], metrics["baking/persona/kl_after"],
             metrics["baking/persona/kl_reduction"])
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=metrics, artifacts={"report": report},
                       tables=_tables(out), degraded=degraded)
