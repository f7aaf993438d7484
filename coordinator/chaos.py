"""Fault injection for users: the ``chaos:`` config section, the ``--chaos`` flag, and the
coordinator's side of carrying it out.

Four kinds of fault, each at a rate under one seed (``notes-ray-resilience.md``: Ray's own
chaos tests kill workers and raylets in the same spirit):

- **kill** (``kill_rate``): right after the coordinator sends a task to an agent, it kills the
  agent's process (``ray.kill(no_restart=False)``); Ray restarts it and the task's recovery
  policy decides what happens to the task.
- **crash / raise / delay** (``crash_rate``, ``raise_rate``, ``delay_rate``): decided inside the
  agent per (seed, role, task, attempt) by :class:`actors.base.ChaosPlan`: the process exits
  mid-call, an ``InjectedFault`` is raised before the role runs, or the call sleeps ``delay_s``
  first (which trips deadlines).
- **node kill** (``node_kill_rate``, at most ``max_node_kills``): right after a dispatch, the
  node hosting that agent crashes: its raylet and every process it started die by SIGKILL
  (:func:`kill_node`). The node the driver is attached to is never killed (the run would die
  with it); such draws are recorded as skipped.

Coordinator-side draws (kill, node kill) come from a ``random.Random`` seeded with ``seed``, in
dispatch order; agent-side draws are a pure function of (seed, role, task, attempt). Outputs
never depend on the faults: that is what the chaos tests and ``agentforge drill`` check.

``--chaos`` takes ``default`` (the profile in :data:`DEFAULT_PROFILE`) or comma-separated
``key=value`` pairs of this section, e.g. ``--chaos kill_rate=0.2,seed=3``.
"""

from __future__ import annotations

import random
import time
from typing import Any

from pydantic import Field, model_validator

from coordinator.errors import AgentForgeError, ConfigError
from phases.data.config import FrozenConfig

__all__ = ["DEFAULT_PROFILE", "ChaosConfig", "ChaosError", "CoordinatorChaos", "kill_node", "parse_chaos_flag"]


class ChaosError(AgentForgeError):
    """A fault could not be injected (e.g. the node to kill is unknown or already dead)."""


class ChaosConfig(FrozenConfig):
    """The ``chaos:`` section. All rates are per dispatch, in [0, 1]; all zero: chaos is off."""

    seed: int = Field(0, ge=0)
    # Coordinator side: kill the agent's process right after sending it a task (Ray restarts it).
    kill_rate: float = Field(0.0, ge=0, le=1)
    # Agent side (one draw per call picks at most one of these three; their sum must be <= 1).
    crash_rate: float = Field(0.0, ge=0, le=1)  # the agent process exits mid-call
    raise_rate: float = Field(0.0, ge=0, le=1)  # InjectedFault raised before the role runs
    delay_rate: float = Field(0.0, ge=0, le=1)  # sleep delay_s before the role runs
    delay_s: float = Field(0.5, ge=0, allow_inf_nan=False)
    # Kill the node hosting the agent right after a dispatch (never the driver's node).
    node_kill_rate: float = Field(0.0, ge=0, le=1)
    max_node_kills: int = Field(1, ge=0)  # a bound, so a run cannot lose its whole cluster
    # Roles that faults may hit; empty: every role.
    only_roles: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_total(self) -> ChaosConfig:
        if self.crash_rate + self.raise_rate + self.delay_rate > 1.0 + 1e-12:
            raise ValueError("crash_rate + raise_rate + delay_rate must be <= 1 (one agent-side fault per call)")
        return self

    @property
    def active(self) -> bool:
        """Whether any fault can happen."""
        return any((self.kill_rate, self.crash_rate, self.raise_rate, self.delay_rate,
                    self.node_kill_rate and self.max_node_kills))

    def agent_plan(self) -> Any:
        """The agent-side :class:`actors.base.ChaosPlan`, or None when it injects nothing."""
        if not (self.crash_rate or self.raise_rate or self.delay_rate):
            return None
        from actors.base import ChaosPlan  # imports Ray: only when chaos is really on

        return ChaosPlan(seed=self.seed, crash_rate=self.crash_rate, raise_rate=self.raise_rate,
                         delay_rate=self.delay_rate, delay_s=self.delay_s, only_roles=self.only_roles)


# What a bare ``--chaos`` turns on: every kind of agent fault, often enough that a 20-task graph
# sees several, rarely enough that a 6-attempt retry policy always gets through.
DEFAULT_PROFILE: dict[str, Any] = {"kill_rate": 0.1, "raise_rate": 0.05, "delay_rate": 0.05, "delay_s": 0.2}


def parse_chaos_flag(text: str) -> list[str]:
    """``--chaos`` value -> ``chaos.key=value`` overrides.

    ``"default"`` (or an empty string) gives :data:`DEFAULT_PROFILE`; otherwise comma-separated
    ``key=value`` pairs, e.g. ``"kill_rate=0.2,node_kill_rate=0.5,seed=3"``.

    Raises:
        ConfigError: a pair without ``=`` or an unknown key (the known keys listed).
    """
    text = (text or "").strip()
    if text in ("", "default", "on"):
        return [f"chaos.{k}={v}" for k, v in DEFAULT_PROFILE.items()]
    out = []
    known = sorted(ChaosConfig.model_fields)
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--chaos {text!r}: {part!r} must look like key=value (or use --chaos default)",
                              [("chaos", f"bad item {part!r}")])
        if key not in known:
            raise ConfigError(f"--chaos: unknown key {key!r}; known: {', '.join(known)}",
                              [(f"chaos.{key}", "unknown key")])
        out.append(f"chaos.{key}={value.strip()}")
    return out


def _node_info(node_id: str) -> dict[str, Any]:
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node
    raise ChaosError(f"node {node_id} is not part of this Ray cluster")


def _crash_this_node() -> int:
    """Runs on the victim node: SIGKILL its raylet and every process the raylet started (workers,
    agents, this task's own worker last). Returns only if there was nothing to kill."""
    import os

    import psutil  # Ray ships it (ray/thirdparty_files), on sys.path once ray is imported

    me = psutil.Process()
    raylet = me.parent()
    if raylet is None or "raylet" not in raylet.name():
        return -1  # not started by a raylet (e.g. a local-mode worker): refuse rather than guess
    for proc in raylet.children(recursive=True):
        if proc.pid != me.pid:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    raylet.kill()
    os._exit(1)


def kill_node(node_id: str, timeout_s: float = 60.0) -> None:
    """Crash node ``node_id`` as far as Ray can tell: its raylet and every process it started
    (actor and task workers, agents) die by SIGKILL at once, with no drain and no goodbye.

    A task pinned to the node (``NodeAffinitySchedulingStrategy``, 0 CPUs) does the killing, so
    this works on any cluster the driver reaches, with public APIs only. Killing the raylet alone
    (Ray's ``RayletKiller`` chaos actor, a ShutdownRaylet RPC) is not a node loss: the node's
    actor processes go on serving calls for seconds. The GCS then declares the node dead after its
    health checks fail (``health_check_*`` settings; about 2 s on ``cluster.LocalCluster``).

    Raises:
        ChaosError: the node is unknown or dead, or hosts this driver, or did not die in time.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node_id == ray.get_runtime_context().get_node_id():
        raise ChaosError(f"node {node_id} hosts this driver; killing it would end the run")
    if not _node_info(node_id).get("Alive"):
        raise ChaosError(f"node {node_id} is already dead")
    task = ray.remote(_crash_this_node).options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    ref = task.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        raise ChaosError(f"the task that kills node {node_id} did not end within {timeout_s:g} s")
    try:
        code = ray.get(ref)
    except ray.exceptions.RayError:
        return  # its worker died with the node: the expected outcome
    raise ChaosError(f"node {node_id}: the killer task found no raylet to kill (returned {code})")


class CoordinatorChaos:
    """The coordinator-side faults of one team run: decides and carries out kills after dispatches.

    Args:
        config: the chaos section.
        node_killer: how a node is killed (default :func:`kill_node`); tests may pass another.
    Attributes:
        events: every fault injected or skipped, in order (``{"time", "fault", "role", "task", ...}``).
    """

    def __init__(self, config: ChaosConfig, node_killer: Any = None):
        self.cfg = config
        self._rng = random.Random(config.seed)
        self._node_killer = node_killer or kill_node
        self.node_kills = 0
        self.events: list[dict[str, Any]] = []

    def after_dispatch(self, role: str, task: str, handle: Any, node_id: str | None) -> list[dict[str, Any]]:
        """Draw and inject the faults for one dispatch; returns the events it added."""
        import ray

        if self.cfg.only_roles and role not in self.cfg.only_roles:
            return []
        added: list[dict[str, Any]] = []
        # Two draws per dispatch, always, so the sequence does not depend on earlier outcomes.
        kill_u, node_u = self._rng.random(), self._rng.random()
        if self.cfg.kill_rate and kill_u < self.cfg.kill_rate:
            ray.kill(handle, no_restart=False)  # a crash mid-task; Ray restarts the actor
            added.append({"fault": "kill", "role": role, "task": task})
        if (self.cfg.node_kill_rate and node_u < self.cfg.node_kill_rate and self.node_kills < self.cfg.max_node_kills
                and node_id):
            try:
                self._node_killer(node_id)
                self.node_kills += 1
                added.append({"fault": "node_kill", "role": role, "task": task, "node_id": node_id})
            except ChaosError as exc:
                added.append({"fault": "node_kill_skipped", "role": role, "task": task, "node_id": node_id,
                              "reason": str(exc)})
        for event in added:
            event["time"] = time.time()
        self.events.extend(added)
        return added
