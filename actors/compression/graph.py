"""The compression orchestrator's task graph: which agent does what, in which order, under which
recovery policy. The coordinator (:class:`coordinator.team.Team`) runs it.

For a strategy's stages (:data:`phases.compression.config.STAGES`) the graph is::

    analyze -> plan -> [prune | student | prune-1 -> distill-1 -> ... -> prune-n -> distill-n]
            -> [distill] -> quantize-<codec> (one per codec, in parallel) -> search -> validate
            -> package -> profile -> report

Recovery: every task is idempotent (it writes files named after itself), so a crashed or killed
agent is retried, then restarted (Ray recreates the actor; the roles are stateless); anything
else escalates with a structured error. ``quantize-seedlm`` declares a simpler algorithm: when
SeedLM fails (too slow for its budget, ``SeedLMTooSlow``), the task falls back to int8 on the
same agent and the report says so. Kills never fall back: they are retried, so a kill cannot
change which codec a task used.
"""

from __future__ import annotations

from typing import Any

from actors.base import AgentSpec, TeamSpec
from actors.policies import FALLBACK_POLICY, TASK_POLICY
from coordinator.dag import TaskSpec
from phases.compression.config import CompressConfig
from phases.compression.pruning import progressive_schedule

__all__ = ["AGENTS", "SEEDLM_POLICY", "TASK_POLICY", "compression_graph", "compression_team"]

AGENTS = ("model-analyzer", "compression-orchestrator", "pruning-agent", "knowledge-distiller", "quantization-agent",
          "architecture-optimizer", "compression-validator", "deployment-packager", "performance-profiler")

SEEDLM_POLICY = FALLBACK_POLICY


def compression_graph(cfg: CompressConfig, common: dict[str, Any]) -> tuple[TaskSpec, ...]:
    """The tasks for ``cfg.strategy``; ``common`` goes into every payload (input, work, data,
    seed, eval, out); ``cfg`` is added as ``payload["cfg"]``."""
    base = {**common, "cfg": cfg.model_dump(mode="json")}
    tasks: list[TaskSpec] = []

    def add(name: str, role: str, inputs: tuple[str, ...], timeout: float | None = None, **extra: Any) -> None:
        tasks.append(TaskSpec(name=name, role=role, inputs=inputs, payload={**base, **extra},
                              timeout_s=timeout or cfg.task_timeout_s, policy=TASK_POLICY))

    stage_names: list[str] = []
    prev: str | None = None  # the task whose output model the next stage takes (None: the input)

    def after() -> tuple[str, ...]:
        return ("plan",) + ((prev,) if prev else ())

    planned: list[tuple[str, str, dict[str, Any]]] = []  # (name, role, extra) in order
    for stage in cfg.stages:
        if stage == "prune":
            planned.append(("prune", "pruning-agent", {"sparsity": cfg.sparsity}))
        elif stage == "student":
            planned.append(("student", "pruning-agent", {}))
        elif stage == "distill":
            planned.append(("distill", "knowledge-distiller", {}))
        elif stage == "prune-progressive":
            for i, s in enumerate(progressive_schedule(cfg.sparsity, cfg.schedule_steps), 1):
                planned.append((f"prune-{i}", "pruning-agent", {"sparsity": s}))
                planned.append((f"distill-{i}", "knowledge-distiller", {}))
    for name, role, extra in planned:
        add(name, role, after(), **{"from": prev, **extra})
        stage_names.append(name)
        prev = name
    codecs = cfg.codecs if "quantize" in cfg.stages else ("fp32",)  # store the stage's model as it is
    quantize = []
    for codec in codecs:
        name = f"quantize-{codec}"
        payload = {**base, "from": prev, "codec": codec}
        seedlm = codec == "seedlm"
        tasks.append(TaskSpec(name=name, role="quantization-agent", inputs=after(), payload=payload,
                              timeout_s=cfg.task_timeout_s, policy=SEEDLM_POLICY if seedlm else TASK_POLICY,
                              fallback_payload={**payload, "codec": "int8", "fallback_from": "seedlm"} if seedlm else None))
        quantize.append(name)
    q = tuple(quantize)
    tasks.insert(0, TaskSpec(name="plan", role="compression-orchestrator", inputs=("analyze",),
                             payload={**base, "stages": list(cfg.stages), "tasks": stage_names + quantize},
                             timeout_s=cfg.task_timeout_s, policy=TASK_POLICY))
    tasks.insert(0, TaskSpec(name="analyze", role="model-analyzer", payload=base, timeout_s=cfg.task_timeout_s,
                             policy=TASK_POLICY))
    add("search", "architecture-optimizer", q)
    add("validate", "compression-validator", ("search", *q))
    add("package", "deployment-packager", ("search", "validate", *q))
    add("profile", "performance-profiler", ("search", "package", *q))
    add("report", "compression-orchestrator", ("analyze", "search", "validate", "package", "profile", *q, *stage_names))
    return tuple(tasks)


def compression_team(cfg: CompressConfig, common: dict[str, Any], *, name: str = "compress") -> TeamSpec:
    """The nine agents (every one, whatever the strategy: each shows in the dashboard as
    ``RUNID/compress/<role>``) and the graph."""
    import actors.compression  # noqa: F401 - registers the roles

    tasks = compression_graph(cfg, common)
    # Agents that load models in this graph import torch and transformers as they start (see
    # roles._CompressionRole); the orchestrator (plan, report) and roles without tasks do not.
    warm = {t.role for t in tasks if t.role != "compression-orchestrator"}
    return TeamSpec(name=name, agents=tuple(AgentSpec(role=r, num_cpus=cfg.agent_cpus, config={"warm": r in warm})
                                            for r in AGENTS), tasks=tasks)
