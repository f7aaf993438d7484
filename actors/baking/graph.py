"""The baking coordinator's task graph: which agent does what, in which order, under which
recovery policy. The coordinator (:class:`coordinator.team.Team`) runs it::

    plan ----------------> tool-data -> tool-bake -> persona-bake -+-> graph ----------+
    target -> memory ---------------------^-------------^          +-> accelerate -----+-> profile -> package
    plan -> validate-before ---------------------------------------+-> validate-after -+             -> report

``plan`` (the coordinator) generates the train and held-out questions; ``target`` (the hardware
adapter) picks device, dtype and threads; ``memory`` measures what activation checkpointing,
weight tying and a lower dtype would save, and decides whether the fine-tunes checkpoint; the
model optimizer runs Toolformer's data step and the two fine-tunes; the validator measures before
and after and applies the quality gate; the graph optimizer and the accelerator measure their
rewrites and decoders on the baked model; the profiler measures the input and the baked model
(as stored, and with what was applied) one after another in one process, when no other agent
computes; the deployment preparer writes the package for phase 7.

Recovery: every task is idempotent (it writes files named after itself; the fine-tunes are
seeded), so a crashed or killed agent is retried, then restarted (the roles are stateless). The
measuring optimisers (graph, accelerate) declare a simpler algorithm: if one fails (a rewrite or
``torch.compile`` that raises on this machine), the task falls back to measuring without it
(``{"safe": True}``) and the report says so. Kills never fall back: they are retried.
"""

from __future__ import annotations

from typing import Any

from actors.base import AgentSpec, TeamSpec
from actors.policies import FALLBACK_POLICY, TASK_POLICY
from coordinator.dag import TaskSpec
from phases.baking.config import BakingConfig

__all__ = ["AGENTS", "OPTIONAL_POLICY", "TASK_POLICY", "baking_graph", "baking_team", "task_names"]

AGENTS = ("baking-coordinator", "hardware-adapter", "memory-optimizer", "model-optimizer", "quality-validator",
          "baking-profiler", "graph-optimizer", "inference-accelerator", "deployment-preparer")

OPTIONAL_POLICY = FALLBACK_POLICY

# (task, role, inputs); the order is the order the graph lists them in (not the run order).
_TASKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("plan", "baking-coordinator", ()),
    ("target", "hardware-adapter", ()),
    ("memory", "memory-optimizer", ("target",)),
    ("validate-before", "quality-validator", ("plan",)),
    ("tool-data", "model-optimizer", ("plan",)),
    ("tool-bake", "model-optimizer", ("tool-data", "memory")),
    ("persona-bake", "model-optimizer", ("tool-bake", "memory")),
    ("graph", "graph-optimizer", ("persona-bake", "target")),
    ("accelerate", "inference-accelerator", ("persona-bake", "target", "plan")),
    ("validate-after", "quality-validator", ("persona-bake", "validate-before", "plan")),
    # last before packaging, when no other agent computes: the timings are not shared with other work
    ("profile", "baking-profiler", ("persona-bake", "target", "memory", "graph", "accelerate", "validate-after")),
    ("package", "deployment-preparer", ("persona-bake", "tool-data", "target", "memory", "graph", "accelerate",
                                        "validate-after", "profile")),
)
_OPTIONAL = {"graph", "accelerate"}


def task_names() -> list[str]:
    """The graph's work tasks in the order it lists them (all but ``report``, which reads them all)."""
    return [name for name, _, _ in _TASKS]


def baking_graph(cfg: BakingConfig, common: dict[str, Any]) -> tuple[TaskSpec, ...]:
    """The tasks; ``common`` goes into every payload (input, work, out, phase_dir, data, seed,
    eval); ``cfg`` is added as ``payload["cfg"]``."""
    base = {**common, "cfg": cfg.model_dump(mode="json")}
    tasks = []
    for name, role, inputs in _TASKS:
        optional = name in _OPTIONAL
        tasks.append(TaskSpec(name=name, role=role, inputs=inputs, payload=base, timeout_s=cfg.task_timeout_s,
                              policy=OPTIONAL_POLICY if optional else TASK_POLICY,
                              fallback_payload={**base, "safe": True} if optional else None))
    tasks.append(TaskSpec(name="report", role="baking-coordinator", inputs=tuple(t[0] for t in _TASKS),
                          payload=base, timeout_s=cfg.task_timeout_s, policy=TASK_POLICY))
    return tuple(tasks)


def baking_team(cfg: BakingConfig, common: dict[str, Any], *, name: str = "baking") -> TeamSpec:
    """The nine agents (each shows in the dashboard as ``RUNID/baking/<role>``) and the graph."""
    import actors.baking  # noqa: F401 - registers the roles

    tasks = baking_graph(cfg, common)
    return TeamSpec(name=name, agents=tuple(AgentSpec(role=r, num_cpus=cfg.agent_cpus,
                                                      config={"warm": r != "baking-coordinator"})
                                            for r in AGENTS), tasks=tasks)
