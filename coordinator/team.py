"""Runs one agent team: its task graph in dependency order, under breakers, recovery and health.

The coordinator works only with actor handles and codec messages (DESIGN.md: no model math
here). For each ready task it asks the agent's breaker (``coordinator.breakers``), sends the
request (``actors.base.make_request``), and waits on every call at once with ``ray.wait`` and
per-task deadlines. A failure is translated once (``coordinator.recovery.classify``) and turned
into a :class:`~coordinator.recovery.Decision` by the task's policy; this module only acts on
decisions: retry after a backoff, fallback to another role, restart the actor (Ray's own restart:
``ray.kill(no_restart=False)``, the actor restores its checkpoint in ``__init__``), isolate the
agent, roll the team back to its last good checkpoint, or escalate.

Ray supplies the process restarts, placement and waiting; this layer adds what Ray lacks:
breakers, declared fallbacks, rollback to a team checkpoint, escalation policy and SLA
accounting (``health.monitor``).
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from pydantic import Field

from actors.base import TeamSpec, actor_name, make_request, read_reply, spawn_team, wait_ready
from coordinator.breakers import AgentBreaker, BreakerConfig, BreakerEvent
from coordinator.chaos import ChaosConfig, CoordinatorChaos
from coordinator.dag import Scheduler, TaskGraph, TaskSpec, TaskState
from coordinator.errors import AgentUnavailableError, CircuitOpenError
from coordinator.recovery import (
    Decision,
    EscalationError,
    Failure,
    FailureKind,
    RecoveryPolicy,
    Strategy,
    TaskRecovery,
    decide,
    ray_actor_options,
)
from health.monitor import HealthMonitor
from phases.data.config import FrozenConfig

__all__ = ["Team", "TeamConfig", "TeamResult"]


class TeamConfig(FrozenConfig):
    """How a team is supervised (the ``team`` section of a phase config)."""

    breaker: BreakerConfig = BreakerConfig()  # one breaker per agent
    policy: RecoveryPolicy = RecoveryPolicy()  # default policy of tasks that declare none
    heartbeat_interval_s: float = 1.0  # how often every agent is pinged
    missed_beats_unhealthy: int = 3  # consecutive missed beats that make an agent unhealthy
    sla_window_s: float = 60.0  # window of the success ratio and latency percentiles
    ready_timeout_s: float = 120.0  # how long agents may take to start (or restart)
    # Calls sent to one agent at once (one runs, the others wait in its mailbox); more ready
    # tasks wait in the coordinator. Small, so a task's deadline starts near the start of its
    # work rather than at the back of a long actor queue, and a dead agent strands few calls.
    max_inflight_per_agent: int = Field(2, ge=1)


@dataclass
class TeamResult:
    """What a team run produced: outputs by task, final states, and what recovery did."""

    team: str
    outputs: dict[str, Any]
    states: dict[str, str]
    causes: dict[str, str]
    degraded: str | None
    decisions: list[dict[str, Any]]
    dispatches: dict[str, int]  # task -> calls sent (1 = no replay)
    health: dict[str, Any]
    nodes: dict[str, str] = field(default_factory=dict)  # task -> Ray node id that produced its output
    faults: list[dict[str, Any]] = field(default_factory=list)  # coordinator-side chaos events
    metrics: dict[str, float] = field(default_factory=dict)  # health/<team>/... numbers for W&B
    # task -> (first dispatch, done) in seconds since the run started (time.monotonic() = started_at)
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def succeeded(self) -> bool:
        return all(s == TaskState.DONE.value for s in self.states.values())


@dataclass(order=True)
class _Delayed:
    at: float
    seq: int
    task: str = field(compare=False)
    role: str = field(compare=False)


@dataclass
class _Call:
    task: str
    role: str
    started: float
    deadline: float
    generation: int  # bumped by rollback; replies of an older generation are dropped


def _await_alive(role: str, handle: Any, timeout_s: float, restartable: bool = True) -> dict:
    """Wait for a restarting actor and return its ``info()``. With max_task_retries=0 Ray fails
    calls made while the actor is RESTARTING at once (ActorUnavailableError) instead of queueing
    them, so poll until it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentUnavailableError(f"agent {role!r} did not come back within {timeout_s:g} s")
        try:
            return ray.get(handle.info.remote(), timeout=left)
        except ray.exceptions.RayActorError as exc:
            if not restartable and not isinstance(exc, ray.exceptions.ActorUnavailableError):
                raise AgentUnavailableError(f"agent {role!r} is dead and may not restart: {exc}") from exc
            # RESTARTING (ActorUnavailableError), or killed again while restarting (ActorDiedError
            # for that one call): Ray keeps restarting it (max_restarts=-1); the deadline bounds us.
            time.sleep(0.05)
        except ray.exceptions.GetTimeoutError as exc:
            raise AgentUnavailableError(f"agent {role!r} did not come back within {timeout_s:g} s") from exc


class Team:
    """One team of agent actors and its task graph.

    Args:
        spec: the team (agents and tasks).
        run_id: names the actors ``run_id/team/role``.
        work_dir: the team's folder in the run folder (checkpoints, health log and report).
        config: supervision settings.
        chaos: fault injection (the pipeline's ``chaos`` section), or None.
        seed: seeds retry jitter, so decisions replay under a seed.
        node_killer: how chaos kills a node (default ``coordinator.chaos.kill_node``).
    Raises:
        GraphError: the task graph is invalid (checked before any actor starts).
    """

    def __init__(self, spec: TeamSpec, *, run_id: str, work_dir: str | Path, config: TeamConfig | None = None,
                 chaos: ChaosConfig | None = None, seed: int = 0, namespace: str = "agentforge",
                 node_killer: Any = None):
        self.spec, self.run_id, self.cfg = spec, run_id, config or TeamConfig()
        self.work_dir = Path(work_dir)
        self.graph = TaskGraph(spec.tasks, spec.roles)
        self.chaos = chaos if chaos is not None and chaos.active else None
        self.namespace = namespace
        self._rng = random.Random(seed)
        self._chaos = CoordinatorChaos(self.chaos, node_killer) if self.chaos else None
        self.agents: dict[str, Any] = {}
        self._node_of: dict[str, str] = {}  # role -> node id it last ran on
        self.breakers: dict[str, AgentBreaker] = {}
        self.monitor: HealthMonitor | None = None
        self.last_result: TeamResult | None = None  # the last run's result, also when it escalated

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Team":
        """Spawn every agent and wait until each answers."""
        # One policy feeds Ray's own options (CONVENTIONS.md rule 7): an agent that some task's
        # policy may restart gets max_restarts=-1 (our window bounds it), else 0.
        agents = []
        for a in self.spec.agents:
            if a.max_restarts is None:
                mine = [self._policy(t.name) for t in self.spec.tasks if a.role in (t.role, t.fallback_role)]
                restartable = any(ray_actor_options(p)["max_restarts"] == -1 for p in (mine or [self.cfg.policy]))
                a = a.model_copy(update={"max_restarts": -1 if restartable else 0, "max_task_retries": 0})
            agents.append(a)
        self._spec_used = self.spec.model_copy(update={"agents": tuple(agents)})
        self.agents = spawn_team(self._spec_used, run_id=self.run_id, checkpoint_root=self.work_dir / "checkpoints",
                                 namespace=self.namespace, chaos=self.chaos.agent_plan() if self.chaos else None,
                                 replace=True)
        infos = wait_ready(self.agents, timeout_s=self.cfg.ready_timeout_s)
        self._node_of = {role: info["node_id"] for role, info in infos.items()}
        self.monitor = HealthMonitor(self.spec.name, self.agents, interval_s=self.cfg.heartbeat_interval_s,
                                     missed_beats_unhealthy=self.cfg.missed_beats_unhealthy,
                                     window_s=self.cfg.sla_window_s,
                                     log_path=self.work_dir / "health" / "events.jsonl")
        for role in self.spec.roles:
            self.breakers[role] = AgentBreaker(f"{self.spec.name}/{role}", self.cfg.breaker,
                                               on_event=self._breaker_event(role))
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Kill every agent (no restart) and wait until Ray reports each one dead.

        ``ray.kill`` is asynchronous: a call sent right after it may still run. Waiting until the
        name is released (the GCS frees it once the actor is DEAD) makes "stopped" mean stopped.
        """
        for handle in self.agents.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        names = [actor_name(self.run_id, self.spec.name, role) for role in self.agents]
        self.agents = {}
        deadline = time.monotonic() + timeout_s
        for name in names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=self.namespace)
                except ValueError:
                    break
                time.sleep(0.02)

    def __enter__(self) -> "Team":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _breaker_event(self, role: str):
        def on_event(event: BreakerEvent) -> None:
            if self.monitor is not None:
                self.monitor.set_breaker(role, event.new)
        return on_event

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TeamResult:
        """Run the task graph to completion.

        Raises:
            EscalationError: a task's policy escalated; the team is stopped first, and
                ``last_result`` holds the states, decisions and faults up to that point.
        """
        if not self.agents:
            self.start()
        self._sched = Scheduler(self.graph)
        self._inflight: dict[Any, _Call] = {}
        self._delayed: list[_Delayed] = []
        self._seq = itertools.count()
        self._route = {t.name: t.role for t in self.spec.tasks}
        self._recs = {t.name: TaskRecovery(restarts={}) for t in self.spec.tasks}
        shared_budgets: dict = {}
        for rec in self._recs.values():
            rec.restarts = shared_budgets  # intensity counts an agent's restarts across its tasks
        self._generation = {t.name: 0 for t in self.spec.tasks}
        self._dispatches = {t.name: 0 for t in self.spec.tasks}
        self._task_node: dict[str, str] = {}
        self._t0 = time.monotonic()
        self._first_dispatch: dict[str, float] = {}
        self._done_at: dict[str, float] = {}
        self._queue: dict[str, deque[str]] = {role: deque() for role in self.spec.roles}
        self._busy: Counter[str] = Counter()  # role -> calls in flight
        self._isolated: dict[str, str] = {}
        self._payload: dict[str, Any] = {}  # task -> the fallback payload it now runs with
        self._decisions: list[dict[str, Any]] = []
        self._last_good: tuple[str, frozenset[str]] | None = None  # (tag, tasks done at it)
        next_beat = time.monotonic()
        try:
            while True:
                for task in self._sched.ready():
                    self._sched.start(task.name)
                    self._queue[self._route[task.name]].append(task.name)
                self._pump()
                now = time.monotonic()
                while self._delayed and self._delayed[0].at <= now:
                    d = heapq.heappop(self._delayed)
                    self._dispatch(d.task, d.role)
                if (not self._inflight and not self._delayed and not any(self._queue.values())
                        and not self._sched.ready()):
                    break
                wake = [next_beat] + [c.deadline for c in self._inflight.values()]
                wake += [self._delayed[0].at] if self._delayed else []
                timeout = max(0.0, min(wake) - time.monotonic())
                if len(self._inflight) == 1:
                    # One call out (a chain of tasks): ray.get with a timeout waits and fetches in
                    # one round trip, where ray.wait + ray.get take two.
                    (ref,) = self._inflight
                    try:
                        self._complete(ref, ray.get(ref, timeout=timeout))
                    except ray.exceptions.GetTimeoutError:
                        pass  # nothing finished before the next deadline or heartbeat
                    except Exception as exc:  # noqa: BLE001 - the call failed: classified in _complete
                        self._complete(ref, error=exc)
                elif self._inflight:
                    refs = list(self._inflight)
                    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                    if ready and len(refs) > 1:  # take every reply already there, not one per pass
                        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    for ref in ready:
                        self._complete(ref)
                else:
                    time.sleep(timeout)
                self._expire(time.monotonic())
                if time.monotonic() >= next_beat:
                    self.monitor.beat_once(timeout_s=min(0.2, self.cfg.heartbeat_interval_s))
                    next_beat = time.monotonic() + self.cfg.heartbeat_interval_s
        except EscalationError as err:
            self._sched.fail(err.task, f"escalated: {err.reason}")
            self.last_result = self._result()  # what happened up to the escalation, for reports
            self.stop()
            raise
        self.last_result = self._result()
        return self.last_result

    def _policy(self, task: str) -> RecoveryPolicy:
        return self.graph[task].policy or self.cfg.policy

    def _pump(self) -> None:
        """Send queued tasks to agents with room (``max_inflight_per_agent``)."""
        limit = self.cfg.max_inflight_per_agent
        for role, queue in self._queue.items():
            while queue and self._busy[role] < limit:
                self._dispatch(queue.popleft(), role)

    def _dispatch(self, task: str, role: str) -> None:
        """Send ``task`` to ``role`` (or fail it fast when the breaker is open)."""
        if role in self._isolated:
            spec = self.graph[task]
            alt = spec.fallback_role
            if alt and alt not in self._isolated and alt != role:
                self._route[task], role = alt, alt
            else:
                self._sched.fail(task, f"agent {role!r} is isolated: {self._isolated[role]}", TaskState.ISOLATED)
                return
        breaker = self.breakers[role]
        if not breaker.allow():
            err = CircuitOpenError(f"agent {role!r}: circuit open")
            self._recover(task, role, Failure(task, role, FailureKind.circuit_open, str(err), executed=False))
            return
        spec = self.graph[task]
        self._dispatches[task] += 1
        self._first_dispatch.setdefault(task, time.monotonic() - self._t0)
        attempt = self._dispatches[task] - 1
        msg = make_request(task, self._payload.get(task, spec.payload), self._sched.inputs_of(task), attempt=attempt,
                           deadline=time.time() + spec.timeout_s)
        handle = self.agents[role]
        ref = handle.handle.remote(msg)
        now = time.monotonic()
        self._inflight[ref] = _Call(task, role, now, now + spec.timeout_s, self._generation[task])
        self._busy[role] += 1
        if self._chaos is not None:
            self._chaos.after_dispatch(role, task, handle, self._node_of.get(role))

    _UNSET = object()

    def _complete(self, ref: Any, value: Any = _UNSET, error: BaseException | None = None) -> None:
        """Handle a finished call: ``value`` or ``error`` when already fetched, else ``ray.get``."""
        call = self._inflight.pop(ref)
        self._busy[call.role] -= 1
        latency = time.monotonic() - call.started
        stale = call.generation != self._generation[call.task]
        try:
            if error is not None:
                raise error
            reply = read_reply(ray.get(ref) if value is Team._UNSET else value)
        except Exception as exc:  # noqa: BLE001 - every failure is classified and decided on
            if stale:
                return
            # InjectedFault / DeadlineExceeded say the role never ran: safe to retry even when
            # the task is not idempotent.
            failure = Failure.of(call.task, call.role, exc,
                                 executed=False if getattr(exc, "before_execution", False) else None)
            self.breakers[call.role].record_failure(exc)
            self.monitor.record_call(call.role, False, latency, failure.kind.value)
            self._recover(call.task, call.role, failure)
            return
        self.breakers[call.role].record_success()
        self.monitor.record_call(call.role, True, latency)
        if reply.get("node_id"):
            self._node_of[call.role] = reply["node_id"]
        if stale:
            return
        self._task_node[call.task] = reply.get("node_id") or ""
        self._done_at[call.task] = time.monotonic() - self._t0
        self._sched.done(call.task, reply["output"])
        if self.graph[call.task].checkpoint:
            self._checkpoint(call.task)

    def _expire(self, now: float) -> None:
        for ref, call in list(self._inflight.items()):
            if now > call.deadline:
                del self._inflight[ref]
                self._busy[call.role] -= 1
                exc = TimeoutError(f"task {call.task!r} on {call.role!r} passed its {self.graph[call.task].timeout_s:g} s deadline")
                self.breakers[call.role].record_failure(exc)
                self.monitor.record_call(call.role, False, now - call.started, FailureKind.timeout.value)
                self._recover(call.task, call.role, Failure(call.task, call.role, FailureKind.timeout, str(exc)))

    # -- acting on decisions ----------------------------------------------------------------
    def _recover(self, task: str, role: str, failure: Failure) -> None:
        spec, breaker = self.graph[task], self.breakers[role]
        d = decide(self._policy(task), failure, self._recs[task], idempotent=spec.idempotent,
                   fallback_role=self._fallback_target(spec, role),
                   breaker_open=breaker.state == "open", has_checkpoint=self._last_good is not None,
                   now=time.monotonic(), rng=self._rng, unhealthy=not self.monitor.is_healthy(role),
                   breaker_retry_in_s=breaker.seconds_until_trial())
        self._decisions.append({"task": task, "role": role, "kind": failure.kind.value,
                                "action": d.action.value, "reason": d.reason})
        self.monitor.record_recovery(role, d.action.value, task=task, reason=d.reason)
        if d.action is Strategy.retry:
            heapq.heappush(self._delayed, _Delayed(time.monotonic() + d.delay_s, next(self._seq), task, role))
        elif d.action is Strategy.fallback:
            self._route[task] = d.target_role
            if spec.fallback_payload is not None:
                self._payload[task] = spec.fallback_payload
            self._dispatch(task, d.target_role)
        elif d.action is Strategy.restart:
            self._restart(role, failure)
            self._dispatch(task, role)
        elif d.action is Strategy.isolate:
            self._isolate(task, role, d)
        elif d.action is Strategy.rollback:
            self._rollback(task)
        else:
            raise EscalationError.from_decision(self.spec.name, failure, d, self._recs[task])

    @staticmethod
    def _fallback_target(spec: TaskSpec, role: str) -> str | None:
        """Where fallback sends the task: its fallback role, else its own role when it declares a
        simpler algorithm (``fallback_payload``); None once it runs on the fallback role."""
        if role != spec.role:
            return None
        return spec.fallback_role or (spec.role if spec.fallback_payload is not None else None)

    def _restart(self, role: str, failure: Failure) -> None:
        """Ray's own restart: kill the process and let ``max_restarts`` bring it back; it restores
        its latest checkpoint in ``__init__``. A crashed actor is already restarting."""
        handle = self.agents[role]
        if failure.kind in (FailureKind.app_error, FailureKind.timeout):  # alive but failing or stuck
            ray.kill(handle, no_restart=False)
        restartable = self._spec_used.agent(role).max_restarts != 0
        info = _await_alive(role, handle, self.cfg.ready_timeout_s, restartable)
        self._node_of[role] = info["node_id"]
        self.breakers[role].reset(f"restarted after {failure.kind.value}")

    def _isolate(self, task: str, role: str, d: Decision) -> None:
        self._isolated[role] = d.reason
        self.breakers[role].force_open(d.reason)
        self._sched.fail(task, f"agent {role!r} isolated: {d.reason}", TaskState.ISOLATED)

    def _checkpoint(self, task: str) -> None:
        """Every agent checkpoints under tag ``task``: the team's last good state."""
        tag = f"after-{task}"
        ray.get([h.checkpoint.remote(tag) for r, h in self.agents.items() if r not in self._isolated])
        done = frozenset(n for n, s in self._sched.states.items() if s is TaskState.DONE)
        self._last_good = (tag, done)

    def _rollback(self, task: str) -> None:
        """Restore every agent to the last good checkpoint and replay only the tasks after it."""
        tag, done = self._last_good
        ray.get([h.restore.remote(tag) for r, h in self.agents.items() if r not in self._isolated])
        replay = [n for n, s in self._sched.states.items() if n not in done and s is not TaskState.PENDING]
        for name in replay:
            self._generation[name] += 1
        self._inflight = {r: c for r, c in self._inflight.items() if c.task not in replay}
        self._busy = Counter(c.role for c in self._inflight.values())
        for queue in self._queue.values():
            for name in [n for n in queue if n in replay]:
                queue.remove(name)
        self._delayed = [d for d in self._delayed if d.task not in replay]
        heapq.heapify(self._delayed)
        self._sched.reset(replay)

    # -- results ----------------------------------------------------------------------------
    def _write_report(self) -> dict[str, Any]:
        report = self.monitor.report() if self.monitor else {}
        if self.monitor:
            self.monitor.write_report(self.work_dir / "health" / "report.json")
        return report

    def _result(self) -> TeamResult:
        states = {n: s.value for n, s in self._sched.states.items()}
        degraded = None
        if self._isolated:
            degraded = "; ".join(f"agent {r!r} isolated: {why}" for r, why in self._isolated.items())
        return TeamResult(team=self.spec.name, outputs=dict(self._sched.outputs), states=states,
                          causes=dict(self._sched.causes), degraded=degraded, decisions=list(self._decisions),
                          dispatches=dict(self._dispatches), health=self._write_report(),
                          nodes=dict(self._task_node), faults=list(self._chaos.events) if self._chaos else [],
                          metrics=self.monitor.wandb_metrics(), started_at=self._t0,
                          timings={t: (self._first_dispatch[t], d) for t, d in self._done_at.items()})
