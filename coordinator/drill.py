"""``agentforge drill``: show that the agent runtime recovers, here or on a real cluster.

A drill runs one task graph twice on the connected Ray cluster, through the same
:class:`~coordinator.team.Team` every agent team uses: once without faults, once under a chaos
config (:mod:`coordinator.chaos`: agent kills, crashes, raised faults, delays, node kills), and
compares every output. The graph is four layers of five tasks on four agents (``digest-1`` to
``digest-4``, :class:`actors.roles.DigestRole`), each task consuming two tasks of the layer
before, so a lost or wrong output anywhere changes the last layer. Its verdict is computed from
what happened: every task done and every output equal to the fault-free run's.

The report (``drill.json``) counts the faults injected (coordinator side) and the failures the
coordinator saw and recovered from, by kind and by strategy, and the nodes that ran tasks.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actors.base import AgentSpec, TeamSpec
from coordinator.breakers import BreakerConfig
from coordinator.chaos import ChaosConfig
from coordinator.dag import TaskSpec
from coordinator.recovery import EscalationError, RecoveryPolicy, Strategy
from coordinator.team import Team, TeamConfig, TeamResult
from serialization.checkpoint import atomic_write_json

__all__ = ["DRILL_BREAKER", "DRILL_POLICY", "DRILL_ROLES", "DrillReport", "drill_graph", "drill_team", "run_drill"]

DRILL_ROLES = ("digest-1", "digest-2", "digest-3", "digest-4")

# Retry first (cheap: the agent is usually back by then), restart when the process is gone. Kills
# use up retries too: at a 30% fault rate per call (kill 0.2 + raise 0.1), 6 calls leave a
# 1-in-70 chance that some task of 20 runs out of calls; 10 calls leave about 1 in 8,500.
# Five failures in a row open an agent's breaker (about 1 run in 30 at that rate, more when one
# kill fails several calls in flight); retry_when_open makes the task wait for the breaker's
# trial call rather than escalate, and DRILL_BREAKER keeps that wait short.
DRILL_POLICY = RecoveryPolicy(strategies=(Strategy.retry, Strategy.restart), retry_attempts=10,
                              retry_backoff_s=0.05, retry_max_backoff_s=1.0, retry_jitter_s=0.05,
                              retry_total_s=60.0, restart_intensity=10, retry_when_open=True)
DRILL_BREAKER = BreakerConfig(reset_timeout_s=2.0)


def drill_graph(layers: int = 4, width: int = 5, *, work_s: float = 0.02, timeout_s: float = 30.0,
                roles: tuple[str, ...] = DRILL_ROLES, policy: RecoveryPolicy | None = DRILL_POLICY) -> tuple[TaskSpec, ...]:
    """``layers`` x ``width`` tasks named ``L<layer>-<i>``; task i of a layer consumes tasks i and
    i+1 (mod width) of the layer before; tasks go round-robin over ``roles``."""
    tasks = []
    for layer in range(layers):
        for i in range(width):
            inputs = () if layer == 0 else tuple(dict.fromkeys((f"L{layer - 1}-{i}", f"L{layer - 1}-{(i + 1) % width}")))
            tasks.append(TaskSpec(name=f"L{layer}-{i}", role=roles[(layer * width + i) % len(roles)], inputs=inputs,
                                  payload={"layer": layer, "i": i, "work_s": work_s}, timeout_s=timeout_s,
                                  policy=policy))
    return tuple(tasks)


def drill_team(name: str, tasks: tuple[TaskSpec, ...], *, num_cpus: float = 0.25, spread: bool = True) -> TeamSpec:
    """The drill's team: one agent per role its tasks use, spread over the cluster's nodes."""
    roles = tuple(dict.fromkeys(t.role for t in tasks))
    options = {"scheduling_strategy": "SPREAD"} if spread else {}
    return TeamSpec(name=name, agents=tuple(AgentSpec(role=r, num_cpus=num_cpus, options=options) for r in roles),
                    tasks=tasks)


@dataclass
class DrillReport:
    """What a drill measured. ``passed``: every task done and every output equal to the fault-free run."""

    passed: bool
    tasks: int
    done: int
    mismatched: list[str]
    error: str | None
    chaos: dict[str, Any]
    faults_injected: dict[str, int]  # coordinator-side faults by kind (kill, node_kill, ...)
    failures_seen: dict[str, int]  # failures the coordinator saw, by kind (includes agent-side faults)
    recoveries: dict[str, int]  # decisions by strategy
    dispatches: int  # calls sent in the chaos run (tasks + replays)
    nodes_clean: list[str]
    nodes_chaos: list[str]
    wall_s_clean: float
    wall_s_chaos: float
    faults: list[dict[str, Any]] = field(default_factory=list)
    task_nodes: dict[str, str] = field(default_factory=dict)  # chaos run: task -> node that produced its output

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few human lines."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"drill {verdict}: {self.done}/{self.tasks} tasks done, "
                 f"{self.tasks - len(self.mismatched)}/{self.tasks} outputs equal to the fault-free run"]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.mismatched:
            lines.append(f"  outputs that differ: {', '.join(self.mismatched)}")
        lines.append(f"  faults injected by the coordinator: {dict(self.faults_injected) or 'none'}")
        lines.append(f"  failures seen: {dict(self.failures_seen) or 'none'}; recoveries: {dict(self.recoveries) or 'none'}")
        lines.append(f"  calls sent: {self.dispatches} for {self.tasks} tasks; nodes used: {len(self.nodes_chaos)} "
                     f"(fault-free run: {len(self.nodes_clean)}); wall {self.wall_s_chaos:.1f} s "
                     f"(fault-free {self.wall_s_clean:.1f} s)")
        return "\n".join(lines)


def _run(spec: TeamSpec, run_id: str, work_dir: Path, config: TeamConfig, chaos: ChaosConfig | None,
         node_killer: Any) -> tuple[TeamResult | None, str | None, float]:
    t0 = time.perf_counter()
    team = Team(spec, run_id=run_id, work_dir=work_dir, config=config, chaos=chaos, node_killer=node_killer)
    try:
        with team:
            return team.run(), None, time.perf_counter() - t0
    except EscalationError as exc:
        return team.last_result, str(exc), time.perf_counter() - t0


def run_drill(chaos: ChaosConfig, work_dir: str | Path, *, run_id: str = "drill", layers: int = 4, width: int = 5,
              work_s: float = 0.02, config: TeamConfig | None = None, node_killer: Any = None,
              spread: bool = True) -> DrillReport:
    """Run the drill on the connected Ray cluster and write ``work_dir/drill.json``.

    Args:
        chaos: the faults to inject in the second run.
        work_dir: where checkpoints, health logs and the report go (reachable from every node).
        run_id: prefix of the actor names (``run_id-clean/drill/digest-1``, ...).
        layers, width, work_s: the graph's shape and each task's sleep.
        config: supervision settings (default: heartbeats every 0.5 s, breakers that try again
            after 2 s).
        node_killer: how a node is killed (default ``coordinator.chaos.kill_node``).
        spread: place agents with Ray's SPREAD strategy (so a node kill hits some of them).
    """
    work_dir = Path(work_dir)
    config = config or TeamConfig(heartbeat_interval_s=0.5, breaker=DRILL_BREAKER)
    spec = drill_team("drill", drill_graph(layers, width, work_s=work_s), spread=spread)
    clean, clean_err, wall_clean = _run(spec, f"{run_id}-clean", work_dir / "clean", config, None, None)
    if clean is None or not clean.succeeded:
        raise RuntimeError(f"the fault-free drill run failed, so nothing can be compared: "
                           f"{clean_err or (clean.states if clean else '')}")
    result, err, wall = _run(spec, f"{run_id}-chaos", work_dir / "chaos", config, chaos, node_killer)
    n = len(spec.tasks)
    outputs = result.outputs if result else {}
    states = result.states if result else {}
    mismatched = sorted(t for t in clean.outputs if outputs.get(t) != clean.outputs[t])
    done = sum(1 for s in states.values() if s == "done")
    report = DrillReport(
        passed=err is None and done == n and not mismatched, tasks=n, done=done, mismatched=mismatched, error=err,
        chaos=chaos.model_dump(mode="json"),
        faults_injected=dict(Counter(f["fault"] for f in (result.faults if result else []))),
        failures_seen=dict(Counter(d["kind"] for d in (result.decisions if result else []))),
        recoveries=dict(Counter(d["action"] for d in (result.decisions if result else []))),
        dispatches=sum((result.dispatches if result else {}).values()),
        nodes_clean=sorted(set(clean.nodes.values())), nodes_chaos=sorted(set((result.nodes if result else {}).values())),
        wall_s_clean=round(wall_clean, 3), wall_s_chaos=round(wall, 3), faults=list(result.faults if result else []),
        task_nodes=dict(result.nodes if result else {}))
    atomic_write_json(work_dir / "drill.json", report.to_json())
    return report
