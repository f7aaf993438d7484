"""The ADAS orchestrator's task graph: which agent does what, in which order, under which recovery
policy. The coordinator (:class:`coordinator.team.Team`) runs it. For generations 0..G-1::

    plan -> propose-0 -> build-0 -> evaluate-0 -> profile-0 -> safety-0 -> archive-0
                -> propose-1 -> ... -> archive-(G-1) -> deploy -> certify -> report

``plan`` (the orchestrator) resolves the target profile, the device and the recipe space;
``propose-g`` (the architecture proposer) breeds recipes from the archive and its Pareto front
(generation 0 also lists the reference: the input model as it is); ``build-g`` (the candidate
builder) makes each recipe's architecture and deployed artifact; ``evaluate-g`` (the evaluator)
measures held-out accuracy and parity; ``profile-g`` (the latency profiler) measures latency and
memory, alone (no other agent computes while it times); ``safety-g`` (the safety monitor) checks
every requirement of the profile and writes each candidate's evidence file; ``archive-g`` (the
archivist) adds them with their lineage and keeps the Pareto front and the current winner;
``deploy`` (the edge deployer) exports the winner, reloads it and checks parity; ``certify``
(the compliance validator) writes the certificate, or the report of which requirements no
candidate met.

Recovery: every task is idempotent (files named after the recipe's hash; a finished build or
measurement found on disk is reused, so a replay after a kill measures nothing twice and the
archive does not change), so a lost agent's task is retried, then the agent restarted (roles are
stateless).
"""

from __future__ import annotations

from typing import Any

from actors.base import AgentSpec, TeamSpec
from actors.policies import TASK_POLICY
from coordinator.dag import TaskSpec
from phases.adas.config import AdasConfig

__all__ = ["AGENTS", "WARM", "adas_graph", "adas_team", "task_names"]

AGENTS = ("adas-orchestrator", "architecture-proposer", "candidate-builder", "evaluator", "latency-profiler",
          "safety-monitor", "archivist", "edge-deployer", "compliance-validator")

# the roles that load models import torch and transformers when they start (their imports overlap);
# the others handle plain data and never import them
WARM = ("candidate-builder", "evaluator", "latency-profiler", "edge-deployer")


def task_names(generations: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """(task, role, inputs) for every task, in dependency order."""
    tasks: list[tuple[str, str, tuple[str, ...]]] = [("plan", "adas-orchestrator", ())]
    for g in range(generations):
        prev = ("plan",) if g == 0 else ("plan", f"archive-{g - 1}")
        tasks += [
            (f"propose-{g}", "architecture-proposer", prev),
            (f"build-{g}", "candidate-builder", ("plan", f"propose-{g}")),
            (f"evaluate-{g}", "evaluator", ("plan", f"build-{g}")),
            # after evaluate: the profiler times while no other agent computes
            (f"profile-{g}", "latency-profiler", ("plan", f"build-{g}", f"evaluate-{g}")),
            (f"safety-{g}", "safety-monitor", ("plan", f"propose-{g}", f"build-{g}", f"evaluate-{g}", f"profile-{g}")
             + (("safety-0",) if g else ())),
            (f"archive-{g}", "archivist", ("plan", f"safety-{g}") + ((f"archive-{g - 1}",) if g else ())),
        ]
    last = f"archive-{generations - 1}"
    tasks += [("deploy", "edge-deployer", ("plan", last)),
              ("certify", "compliance-validator", ("plan", last, "deploy", "safety-0")),
              ("report", "adas-orchestrator", ("plan", last, "deploy", "certify", "safety-0"))]
    return tasks


def adas_graph(cfg: AdasConfig, common: dict[str, Any]) -> tuple[TaskSpec, ...]:
    """The tasks; ``common`` goes into every payload (input, work, out, phase_dir, data, seed);
    ``cfg`` is added as ``payload["cfg"]``."""
    base = {**common, "cfg": cfg.model_dump(mode="json")}
    return tuple(TaskSpec(name=name, role=role, inputs=inputs, payload=base,
                          timeout_s=cfg.task_timeout_s, policy=TASK_POLICY)
                 for name, role, inputs in task_names(cfg.generations))


def adas_team(cfg: AdasConfig, common: dict[str, Any], *, name: str = "adas") -> TeamSpec:
    """The nine agents (each shows in the dashboard as ``RUNID/adas/<role>``) and the graph."""
    import actors.adas  # noqa: F401 - registers the roles

    return TeamSpec(name=name, agents=tuple(AgentSpec(role=r, num_cpus=cfg.agent_cpus, config={"warm": r in WARM})
                                            for r in AGENTS), tasks=adas_graph(cfg, common))
