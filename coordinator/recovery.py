"""The six recovery strategies as values: a failure goes in, a :class:`Decision` comes out.

A task's :class:`RecoveryPolicy` lists strategies in order; :func:`decide` walks them and returns
the first that applies and still has budget (CONVENTIONS.md rule 6: only the coordinator acts):

1. retry: same agent again after tenacity's exponential backoff with jitter, bounded by attempts
   and total time; only for idempotent tasks or failures known to happen before execution; not
   while the agent's breaker is open, unless the policy's ``retry_when_open`` says to wait for
   the breaker's trial call.
2. fallback: the task's declared alternative role, once.
3. restart: recreate the actor (it restores its checkpoint) and replay the task, within an
   Erlang/OTP restart intensity: more than ``intensity`` restarts in ``period`` seconds and
   restart no longer applies (OTP then escalates to the parent supervisor; so do we).
4. isolate: the agent's breaker is open (or it is unhealthy): hold the breaker open, take the
   agent out, continue the tasks that do not depend on it, mark the result degraded.
5. rollback: restore the team's last good checkpoint and replay the tasks after it.
6. escalate: stop the team and raise :class:`EscalationError`; always the last resort.

Sources: tenacity (wait_exponential, stop_after_attempt | stop_before_delay, RetryCallState);
Erlang/OTP supervisor restart intensity (design_principles/sup_princ); Akka's Escalate
directive; Ray fault tolerance docs (actor max_restarts, max_task_retries).

Where our layer adds what Ray lacks: Ray restarts a dead actor process (``max_restarts``) and can
re-send its tasks (``max_task_retries``), but has no circuit breakers, no declared fallback, no
windowed restart intensity (its count is per lifetime), no rollback to a team checkpoint, no
escalation policy and no SLA. See :func:`ray_actor_options` for how one policy feeds both.
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import tenacity
from pydantic import field_validator, model_validator

from coordinator.errors import AgentForgeError, AgentUnavailableError, CircuitOpenError
from phases.data.config import FrozenConfig

__all__ = [
    "Decision", "EscalationError", "Failure", "FailureKind", "RecoveryPolicy", "RestartBudget",
    "Strategy", "TaskRecovery", "classify", "decide", "ray_actor_options",
]


class Strategy(str, Enum):
    """The six recovery strategies (DESIGN.md, "Agent teams and the coordinator")."""

    retry = "retry"
    fallback = "fallback"
    restart = "restart"
    isolate = "isolate"
    rollback = "rollback"
    escalate = "escalate"


class FailureKind(str, Enum):
    """What kind of failure an agent call had; :func:`classify` maps exceptions to these."""

    app_error = "app_error"  # the task's handler raised
    actor_died = "actor_died"  # the actor process is gone
    actor_unavailable = "actor_unavailable"  # restarting or unreachable: may or may not have executed
    timeout = "timeout"  # the deadline passed (ray.wait)
    circuit_open = "circuit_open"  # failed fast at the breaker: known not executed
    node_died = "node_died"  # the actor's node is gone
    upstream = "upstream"  # an input task failed (reported, never decided on)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A short message: a RayTaskError's cause, else the first line of the exception text."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):  # RayTaskError's str() is the whole remote traceback
        exc = cause
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(exc: BaseException) -> FailureKind:
    """Translate an exception from an agent call into a :class:`FailureKind`, once, at the boundary.

    Ray's classes are looked up only if ``ray.exceptions`` is already loaded: an exception object of
    one of them cannot exist otherwise, and this keeps the module free of a Ray import.
    """
    rex = sys.modules.get("ray.exceptions")
    if rex is not None:
        # RayTaskError first: as_instanceof_cause() makes it an instance of the user's exception
        # class too, so a handler that raised TimeoutError or CircuitOpenError is still app_error.
        if isinstance(exc, rex.RayTaskError):
            return FailureKind.app_error
        # ActorUnavailableError subclasses RayActorError (as does ActorDiedError): test it first.
        if isinstance(exc, rex.ActorUnavailableError):
            return FailureKind.actor_unavailable
        if isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.OutOfMemoryError)):
            return FailureKind.actor_died
        if isinstance(exc, (rex.NodeDiedError, rex.LocalRayletDiedError)):
            return FailureKind.node_died
        if isinstance(exc, rex.ObjectLostError):  # incl. OwnerDiedError: the result's owner is gone
            return FailureKind.actor_died
        if isinstance(exc, rex.GetTimeoutError):
            return FailureKind.timeout
        if isinstance(exc, rex.RayError):  # other system errors: may or may not have executed
            return FailureKind.actor_unavailable
    if isinstance(exc, CircuitOpenError):
        return FailureKind.circuit_open
    if isinstance(exc, AgentUnavailableError):
        return FailureKind.actor_unavailable
    if isinstance(exc, TimeoutError):
        return FailureKind.timeout
    return FailureKind.app_error


@dataclass(frozen=True)
class Failure:
    """One failed attempt of a task.

    ``executed`` is False when the failure is known to have happened before the task ran (e.g. the
    breaker refused it, or the actor was already dead when it was submitted), True when the handler
    ran and raised, None when unknown (died, unavailable or timed out mid-call).
    """

    task: str
    role: str
    kind: FailureKind
    message: str
    executed: bool | None = None

    @classmethod
    def of(cls, task: str, role: str, exc: BaseException, *, executed: bool | None = None) -> Failure:
        """Build a Failure from an exception via :func:`classify`.

        Args:
            executed: overrides the default, which is False for circuit_open, True for app_error
                and None (unknown) otherwise.
        """
        kind = classify(exc)
        if executed is None:
            executed = {FailureKind.circuit_open: False, FailureKind.app_error: True}.get(kind)
        return cls(task, role, kind, _one_line(exc), executed)


_DECIDABLE = tuple(k for k in FailureKind if k is not FailureKind.upstream)


class RecoveryPolicy(FrozenConfig):
    """How a task recovers from failure; one object feeds Ray's actor options and :func:`decide`."""

    # Strategies to try, in order; escalate, if absent, is appended: it is always the last resort.
    strategies: tuple[Strategy, ...] = (Strategy.retry, Strategy.restart, Strategy.escalate)
    # Failure kinds that retry applies to (never while the agent's breaker is open).
    retry_on: tuple[FailureKind, ...] = (FailureKind.app_error, FailureKind.actor_died,
                                         FailureKind.actor_unavailable, FailureKind.timeout,
                                         FailureKind.circuit_open, FailureKind.node_died)
    # Calls including the first (tenacity's stop_after_attempt): 3 = at most 2 retries. Replays
    # after fallback, restart or rollback have their own budgets and do not count here.
    retry_attempts: int = 3
    # First retry delay in seconds; it doubles per retry (tenacity's wait_exponential multiplier).
    retry_backoff_s: float = 0.05
    # Cap on one retry delay, jitter included (a wait for an open breaker is not capped).
    retry_max_backoff_s: float = 2.0
    # Uniform random extra delay in [0, retry_jitter_s], so retries of many tasks do not align.
    retry_jitter_s: float = 0.05
    # No retry is started once it would begin this many seconds after the first failure
    # (tenacity's stop_before_delay), so retrying is bounded in time as well as count.
    retry_total_s: float = 30.0
    # With the agent's breaker open, retry waits for the breaker's one trial call (its reset
    # timeout) instead of being skipped, within retry_attempts and retry_total_s. Off, an open
    # breaker passes the task to the next strategy (isolate, escalate): the breaker's verdict stands.
    retry_when_open: bool = False
    # Failure kinds that restart applies to: the process is gone or stuck. Add app_error to also
    # restart an agent whose handler raises (e.g. corrupted in-memory state).
    restart_on: tuple[FailureKind, ...] = (FailureKind.actor_died, FailureKind.actor_unavailable,
                                           FailureKind.timeout, FailureKind.node_died)
    # OTP restart intensity: at most this many restarts of one agent within restart_period_s;
    # one more and restart no longer applies (0 = never restart).
    restart_intensity: int = 3
    # OTP restart period, seconds (the sliding window of restart_intensity).
    restart_period_s: float = 60.0
    # Rollbacks to the team's last good checkpoint allowed per task.
    rollback_max: int = 1

    @field_validator("strategies")
    @classmethod
    def _check_strategies(cls, v: tuple[Strategy, ...]) -> tuple[Strategy, ...]:
        dups = sorted({s.value for s in v if v.count(s) > 1})
        if dups:
            raise ValueError(f"each strategy may appear once; repeated: {', '.join(dups)}")
        if Strategy.escalate in v and v[-1] is not Strategy.escalate:
            raise ValueError("escalate must be the last strategy (it is the last resort)")
        return v if Strategy.escalate in v else (*v, Strategy.escalate)

    @field_validator("retry_on", "restart_on")
    @classmethod
    def _check_kinds(cls, v: tuple[FailureKind, ...], info) -> tuple[FailureKind, ...]:
        if FailureKind.upstream in v:
            raise ValueError(f"{info.field_name} may list only {', '.join(k.value for k in _DECIDABLE)}; "
                             "upstream failures are not recovered on the failed task's dependents")
        return tuple(dict.fromkeys(v))

    @field_validator("retry_attempts", "restart_intensity", "rollback_max")
    @classmethod
    def _check_count(cls, v: int, info) -> int:
        low = 1 if info.field_name == "retry_attempts" else 0
        if not low <= v <= 1000:
            raise ValueError(f"{info.field_name} must be between {low} and 1000, got {v}")
        return v

    @field_validator("retry_backoff_s", "retry_max_backoff_s", "retry_jitter_s", "retry_total_s", "restart_period_s")
    @classmethod
    def _check_seconds(cls, v: float, info) -> float:
        positive = info.field_name in ("retry_total_s", "restart_period_s")
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ValueError(f"{info.field_name} must be a finite number {'>' if positive else '>='} 0, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_backoff(self) -> RecoveryPolicy:
        if self.retry_max_backoff_s < self.retry_backoff_s:
            raise ValueError(f"retry_max_backoff_s ({self.retry_max_backoff_s}) must be >= "
                             f"retry_backoff_s ({self.retry_backoff_s})")
        return self


def ray_actor_options(policy: RecoveryPolicy) -> dict[str, int]:
    """Ray actor options derived from the policy (CONVENTIONS.md rule 7: declared once).

    - ``max_restarts``: -1 (Ray recreates a dead actor process; it re-runs ``__init__``, which
      restores the agent's checkpoint) when the policy has restart, else 0. Ray's count is per
      lifetime, OTP's is a sliding window, so the bound is ours: once :func:`decide` stops choosing
      restart, the coordinator isolates or escalates and ``ray.kill(actor, no_restart=True)``.
    - ``max_task_retries``: 0, always. Ray would re-send a call after a crash on its own; stacked
      on our retry the attempts would multiply, and a non-idempotent task could run twice without
      anyone deciding it. So Ray restarts the process, and every replay is a :class:`Decision`.
    """
    return {"max_restarts": -1 if Strategy.restart in policy.strategies else 0, "max_task_retries": 0}


@dataclass
class RestartBudget:
    """Restart times of one agent (shared by all its tasks), for the OTP intensity window."""

    times: list[float] = field(default_factory=list)

    def within(self, now: float, period_s: float) -> int:
        """Restarts in the window ``[now - period_s, now]``."""
        return sum(1 for t in self.times if now - t <= period_s)

    def record(self, now: float, period_s: float) -> None:
        """Note a restart at ``now``; forget those older than ``period_s``."""
        self.times = [t for t in self.times if now - t <= period_s] + [now]


@dataclass(frozen=True)
class Decision:
    """What the coordinator should do about a failure.

    Attributes:
        action: the strategy chosen.
        delay_s: wait this long before acting (retry backoff).
        target_role: the role to run the task on next (fallback only).
        reason: one line: which failure, which strategy and why earlier strategies were skipped.
        attempt: how many times this task has now used this strategy (1 = first).
    """

    action: Strategy
    delay_s: float = 0.0
    target_role: str | None = None
    reason: str = ""
    attempt: int = 1


@dataclass
class TaskRecovery:
    """Recovery bookkeeping of one task; keep it across replays (restart, rollback) of the task.

    Attributes:
        restarts: restart budgets by agent role; pass the team's one dict to every TaskRecovery, so
            the intensity counts an agent's restarts across all its tasks (and follows a fallback).
        first_failure_at: clock time of the task's first failure (retry_total_s counts from it).
        history: every decision made for this task, in order.
    """

    restarts: dict[str, RestartBudget] = field(default_factory=dict)
    first_failure_at: float | None = None
    history: list[Decision] = field(default_factory=list)

    def attempts(self, strategy: Strategy) -> int:
        """How many times ``strategy`` was chosen for this task."""
        return Counter(d.action for d in self.history)[strategy]

    @property
    def fallback_used(self) -> bool:
        return self.attempts(Strategy.fallback) > 0


def _retry(policy: RecoveryPolicy, f: Failure, rec: TaskRecovery, idempotent: bool, breaker_open: bool,
           breaker_retry_in_s: float | None, now: float, rng: random.Random) -> tuple[str | None, float]:
    """(why retry does not apply, or None; the delay). The timing is tenacity's."""
    # A circuit_open failure with the breaker no longer open (half-open, its one trial busy) was
    # refused before execution, so a later retry is safe; with the breaker open it is not tried.
    if breaker_open and not policy.retry_when_open:
        return "the agent's circuit breaker is open", 0.0
    if breaker_open and breaker_retry_in_s is None:
        return "the agent's circuit breaker is held open (isolated)", 0.0
    if f.kind not in policy.retry_on:
        return f"{f.kind.value} is not in retry_on", 0.0
    if not idempotent and f.executed is not False:
        return "task is not idempotent and may have executed", 0.0
    if f.kind in (FailureKind.actor_died, FailureKind.node_died) and Strategy.restart not in policy.strategies:
        return "the actor died and the policy has no restart, so Ray does not recreate it (max_restarts=0)", 0.0
    # tenacity's own objects, evaluated on a real RetryCallState: attempt_number counts the calls
    # made so far (the first call plus earlier retries), the clock starts at the first failure.
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = rec.attempts(Strategy.retry) + 1
    state.start_time = rec.first_failure_at if rec.first_failure_at is not None else now
    state.outcome_timestamp = now
    # wait_exponential_jitter would be the one-liner, but it draws jitter from the global
    # random.uniform and takes no RNG; decisions must replay under a seed, so tenacity computes
    # the exponential part and our rng the jitter, clamped to the max as wait_exponential_jitter does.
    wait = tenacity.wait_exponential(multiplier=policy.retry_backoff_s, max=policy.retry_max_backoff_s)
    delay = min(wait(state) + rng.uniform(0.0, policy.retry_jitter_s), policy.retry_max_backoff_s)
    if breaker_open:  # retry_when_open: the call waits for the trial the breaker lets through
        delay = max(delay, breaker_retry_in_s + rng.uniform(0.0, policy.retry_jitter_s))
    state.upcoming_sleep = delay  # tenacity computes the wait before evaluating stop, as here
    if tenacity.stop_after_attempt(policy.retry_attempts)(state):
        return f"all {policy.retry_attempts} attempts used", 0.0
    if tenacity.stop_before_delay(policy.retry_total_s)(state):
        return (f"retry_total_s ({policy.retry_total_s:g}s) would be exceeded "
                f"({now - state.start_time:.2f}s elapsed + {delay:.2f}s backoff)"), 0.0
    return None, delay


def decide(policy: RecoveryPolicy, failure: Failure, rec: TaskRecovery, *, idempotent: bool,
           fallback_role: str | None, breaker_open: bool, has_checkpoint: bool, now: float,
           rng: random.Random, unhealthy: bool = False, breaker_retry_in_s: float | None = 0.0) -> Decision:
    """Choose how to recover from ``failure``: the first applicable strategy with budget left.

    Deterministic: it reads no clock and does no I/O. It books the decision in ``rec`` (its history
    and, for restart, the failing role's restart budget) so a budget cannot be forgotten, and draws retry
    jitter from ``rng``; the same inputs, history and seed give the same decision.

    Args:
        policy: the task's policy.
        failure: what went wrong.
        rec: the task's bookkeeping (updated).
        idempotent: whether the task may run twice.
        fallback_role: the task's declared fallback role, if any.
        breaker_open: whether the failing agent's breaker is open.
        has_checkpoint: whether the team has a last good checkpoint to roll back to.
        now: the coordinator's clock (monotonic seconds).
        rng: source of retry jitter, e.g. ``random.Random(seed)``.
        unhealthy: whether the health monitor declared the agent unhealthy (makes isolate apply).
        breaker_retry_in_s: with the breaker open, seconds until it lets its trial call through;
            None while it is held open (isolated). Read only by ``retry_when_open`` policies.
    Returns:
        The decision; escalate when nothing else applies.
    Raises:
        ValueError: for an ``upstream`` failure (dependents of a failed task are not recovered).
    """
    if failure.kind is FailureKind.upstream:
        raise ValueError(f"task {failure.task!r}: upstream failures are not decided on; the scheduler marks them")
    if rec.first_failure_at is None:
        rec.first_failure_at = now
    skipped: list[str] = []
    chosen: Decision | None = None
    for s in policy.strategies:
        n = rec.attempts(s) + 1
        why, delay, detail = None, 0.0, ""
        if s is Strategy.retry:
            why, delay = _retry(policy, failure, rec, idempotent, breaker_open, breaker_retry_in_s, now, rng)
            detail = f"call {n + 1}/{policy.retry_attempts} after {delay:.3f}s"
        elif s is Strategy.fallback:
            why = ("no fallback role declared" if fallback_role is None
                   else f"fallback role {fallback_role!r} already used" if rec.fallback_used else None)
            detail = f"to role {fallback_role!r}"
        elif s is Strategy.restart:
            used = rec.restarts.get(failure.role, RestartBudget()).within(now, policy.restart_period_s)
            if failure.kind not in policy.restart_on:
                why = f"{failure.kind.value} is not in restart_on"
            elif used >= policy.restart_intensity:
                why = (f"restart intensity spent ({used} restarts of {failure.role!r} within "
                       f"{policy.restart_period_s:g}s, intensity {policy.restart_intensity})")
            detail = f"restart {used + 1}/{policy.restart_intensity} within {policy.restart_period_s:g}s"
        elif s is Strategy.isolate:
            if not (breaker_open or unhealthy or failure.kind is FailureKind.circuit_open):
                why = "the agent's breaker is closed and it is not declared unhealthy"
            detail = "breaker open" if breaker_open or failure.kind is FailureKind.circuit_open else "unhealthy"
        elif s is Strategy.rollback:
            if not has_checkpoint:
                why = "the team has no last good checkpoint"
            elif n > policy.rollback_max:
                why = f"rollback_max ({policy.rollback_max}) used"
            detail = f"rollback {n}/{policy.rollback_max}"
        else:
            detail = "last resort"
        if why is not None:
            skipped.append(f"{s.value} skipped: {why}")
            continue
        reason = f"task {failure.task!r} on {failure.role!r} failed ({failure.kind.value}: {failure.message}); " \
                 f"{s.value} ({detail})" + "".join(f"; {x}" for x in skipped)
        chosen = Decision(s, delay, fallback_role if s is Strategy.fallback else None, " ".join(reason.split()), n)
        break
    assert chosen is not None, "escalate is always the last strategy"  # RecoveryPolicy guarantees it
    if chosen.action is Strategy.restart:
        rec.restarts.setdefault(failure.role, RestartBudget()).record(now, policy.restart_period_s)
    rec.history.append(chosen)
    return chosen


class EscalationError(AgentForgeError):
    """A team gave up on a task: the structured error the pipeline aborts or continues on.

    Attributes: ``team``, ``task``, ``role``, ``kind`` (a FailureKind), ``reason`` (the final
    decision's reason) and ``history`` (every Decision made for the task, in order).
    """

    def __init__(self, team: str, task: str, role: str, kind: FailureKind, reason: str,
                 history: tuple[Decision, ...] | list[Decision] = ()):
        self.team, self.task, self.role, self.kind, self.reason = team, task, role, FailureKind(kind), reason
        self.history = tuple(history)
        tried = ", ".join(d.action.value for d in self.history if d.action is not Strategy.escalate) or "nothing"
        line = " ".join(f"team {team!r}: task {task!r} (role {role!r}) escalated after {self.kind.value}; "
                        f"tried: {tried}; {reason}".split())
        super().__init__(line)

    def __reduce__(self):  # the default would re-call __init__ with the message alone
        return type(self), (self.team, self.task, self.role, self.kind, self.reason, self.history)

    def to_dict(self) -> dict:
        """Plain data for result.json and logs."""
        return {"type": "escalation", "team": self.team, "task": self.task, "role": self.role,
                "kind": self.kind.value, "reason": self.reason,
                "tried": [d.action.value for d in self.history if d.action is not Strategy.escalate]}

    @classmethod
    def from_decision(cls, team: str, failure: Failure, decision: Decision, rec: TaskRecovery) -> EscalationError:
        """The error for an escalate ``decision`` about ``failure``."""
        return cls(team, failure.task, failure.role, failure.kind, decision.reason, rec.history)
