"""One circuit breaker per agent, on top of pybreaker, for asynchronous (Ray) calls.

pybreaker (github.com/danielfm/pybreaker, 1.4.1; the pattern is Nygard's "Release It!") guards a
*synchronous* call: ``cb.call(f)`` checks the state, runs ``f`` and counts the outcome in one step.
A Ray call is submitted now and its result arrives later, so :class:`AgentBreaker` splits that
step in two: :meth:`AgentBreaker.allow` asks before submitting, and
:meth:`AgentBreaker.record_success` / :meth:`AgentBreaker.record_failure` report the outcome
afterwards by driving pybreaker's own ``call()`` with a function that returns or re-raises. So the
counting is pybreaker's: CONSECUTIVE failures (any success resets the count, it is not a rate),
opening on the ``fail_max``-th, and ``success_threshold`` trial successes closing a half-open
breaker.

What is ours, and why:
- The open -> half-open timing. pybreaker decides it inside ``call()`` by comparing
  ``datetime.now(UTC)`` with the time it opened, and runs that same call as the trial. Here the
  trial is *submitted* in ``allow()`` and its outcome comes later, so ``allow()`` decides with our
  injectable monotonic clock (immune to wall-clock jumps, and tests need no sleeps) and moves
  pybreaker with its public ``half_open()``. We never drive ``call()`` while pybreaker is open,
  so its datetime check never runs against our clock.
- Exactly one trial in flight while half-open (pybreaker lets every concurrent caller through).
- ``force_open`` holds the breaker open for the isolate strategy (resilience4j's FORCED_OPEN):
  no trial until :meth:`AgentBreaker.reset`.
- Every state change becomes a :class:`BreakerEvent` for metrics and the health log.

The breaker holds locks, so it cannot be pickled: it lives in the coordinator, never in an actor
argument.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pybreaker
from pydantic import field_validator

from coordinator.errors import CircuitOpenError
from phases.data.config import FrozenConfig

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "AgentBreaker", "BreakerConfig", "BreakerEvent"]

log = logging.getLogger("agentforge")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class BreakerConfig(FrozenConfig):
    """Circuit breaker settings, one breaker per agent."""

    # Consecutive failed calls that open the breaker (a success in between resets the count).
    fail_max: int = 5
    # Seconds the breaker stays open (calls fail fast) before one trial call is let through.
    reset_timeout_s: float = 30.0
    # Successful trial calls, one at a time, needed to close a half-open breaker.
    success_threshold: int = 1

    @field_validator("fail_max", "success_threshold")
    @classmethod
    def _check_count(cls, v: int, info) -> int:
        if not 1 <= v <= 1_000_000:
            raise ValueError(f"{info.field_name} must be between 1 and 1000000, got {v}")
        return v

    @field_validator("reset_timeout_s")
    @classmethod
    def _check_timeout(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"reset_timeout_s must be a finite number > 0, got {v!r}")
        return v


@dataclass(frozen=True)
class BreakerEvent:
    """A breaker state change: ``old`` -> ``new`` at clock time ``at``, and why."""

    agent: str
    old: str
    new: str
    at: float
    reason: str


class _Listener(pybreaker.CircuitBreakerListener):
    """Forwards pybreaker's state changes to the owning AgentBreaker."""

    def __init__(self, owner: AgentBreaker):
        self._owner = owner

    def state_change(self, cb, old_state, new_state) -> None:
        self._owner._on_state_change(old_state.name if old_state is not None else CLOSED, new_state.name)


def _reraise(exc: BaseException) -> None:
    raise exc


class AgentBreaker:
    """The circuit breaker of one agent.

    Every ``allow()`` (or ``check()``) that says yes must be followed by exactly one
    ``record_success()`` or ``record_failure()`` (a timeout is a failure): otherwise a half-open
    breaker waits for its trial's outcome forever (the stuck-trial problem of resilience4j#903).

    Args:
        name: the agent's name (``RUNID/team/role``), used in events and errors.
        cfg: the breaker settings.
        on_event: called with a :class:`BreakerEvent` on every state change (in order).
        clock: monotonic seconds; inject a fake one in tests.
    """

    def __init__(self, name: str, cfg: BreakerConfig | None = None, *,
                 on_event: Callable[[BreakerEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.cfg = cfg if cfg is not None else BreakerConfig()
        self._on_event = on_event
        self._clock = clock
        self._lock = threading.RLock()
        self._opened_at: float | None = None  # our clock's time of the last move to open
        self._trial_in_flight = False
        self._forced: str | None = None  # the isolate reason while held open
        self._last_failure = ""
        self._reason = ""  # why the transition now being made happens (read by the listener)
        self._pending: deque[BreakerEvent] = deque()  # emitted once pybreaker has finished
        # throw_new_error_on_trip=False: the tripping call re-raises the failure we reported
        # instead of a CircuitBreakerError, so record_failure sees its own exception either way.
        self._cb = pybreaker.CircuitBreaker(
            fail_max=self.cfg.fail_max, reset_timeout=self.cfg.reset_timeout_s,
            success_threshold=self.cfg.success_threshold, listeners=[_Listener(self)],
            name=name, throw_new_error_on_trip=False)

    # -- views -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The state: closed, open or half-open (open turns half-open lazily, at the next allow())."""
        return self._cb.current_state

    @property
    def fail_counter(self) -> int:
        """Consecutive failures counted by pybreaker."""
        return self._cb.fail_counter

    @property
    def forced(self) -> str | None:
        """The isolate reason while the breaker is held open by ``force_open``, else None."""
        return self._forced

    def seconds_until_trial(self) -> float | None:
        """Seconds until an open breaker lets its trial through; 0 if closed or due; None if forced."""
        with self._lock:
            if self._forced is not None:
                return None
            if self.state != OPEN or self._opened_at is None:
                return 0.0
            return max(0.0, self._opened_at + self.cfg.reset_timeout_s - self._clock())

    # -- before a call -----------------------------------------------------------------------
    def allow(self) -> bool:
        """May a call be submitted now? Closed: yes. Open: no, until reset_timeout has passed; then
        the breaker turns half-open and allows ONE trial. Half-open with a trial in flight: no.
        """
        with self._changing():
            state = self.state
            if state == CLOSED:
                return True
            if state == OPEN:
                if self._forced is not None or self.seconds_until_trial() > 0:
                    return False
                self._reason = f"reset timeout {self.cfg.reset_timeout_s:g}s elapsed: one trial call allowed"
                self._cb.half_open()
            if self._trial_in_flight:
                return False
            self._trial_in_flight = True
            return True

    def check(self) -> None:
        """Like ``allow()``, but raises instead of returning False.

        Raises:
            CircuitOpenError: naming the agent, why, and the seconds until the trial call; its
                ``agent`` and ``retry_in_s`` attributes (None while forced open) carry them too.
        """
        if self.allow():
            return
        with self._lock:
            if self._forced is not None:
                why, wait = f"is held open (isolated: {self._forced}); no trial call until it is reset", None
            elif self.state == HALF_OPEN:
                why, wait = "is half-open and its one trial call is still in flight", 0.0
            else:
                wait = self.seconds_until_trial()
                last = f" (last failure: {self._last_failure})" if self._last_failure else ""
                why = f"is open{last}; trial call in {wait:.2f}s"
        err = CircuitOpenError(f"agent {self.name!r}: circuit breaker {why}")
        err.agent, err.retry_in_s = self.name, wait  # structured, for the coordinator's Failure
        raise err

    # -- after a call ------------------------------------------------------------------------
    def record_success(self) -> None:
        """Report that an allowed call succeeded (pybreaker resets the count or counts a trial)."""
        if self._cb.current_state == CLOSED and self._cb.fail_counter == 0 and not self._pending:
            return  # fast path: pybreaker would only reset an already-zero count (no event, no change)
        with self._changing():
            if self.state == OPEN:
                return  # a call submitted before the breaker opened: not the trial, ignored
            if self.state == HALF_OPEN:
                self._reason = "trial call succeeded"
                self._trial_in_flight = False  # the next trial (success_threshold > 1) may go
            self._cb.call(lambda: None)
            self._reason = ""

    def record_failure(self, exc: BaseException) -> None:
        """Report that an allowed call failed (a timeout too); pybreaker counts it and may open.

        Args:
            exc: the failure; it is re-raised inside pybreaker's ``call()`` and caught here, and its
                traceback and context are restored afterwards.
        """
        with self._changing():
            if self.state == OPEN:
                return  # already open: late outcomes of earlier calls do not move it
            self._last_failure = f"{type(exc).__name__}: {exc}"
            if self.state == HALF_OPEN:
                self._reason = f"trial call failed: {self._last_failure}"
            else:
                self._reason = f"{self.cfg.fail_max} consecutive failures (last: {self._last_failure})"
            tb, ctx = exc.__traceback__, exc.__context__
            try:
                self._cb.call(_reraise, exc)
            except BaseException as raised:
                if raised is not exc and not isinstance(raised, pybreaker.CircuitBreakerError):
                    raise
            finally:
                exc.__traceback__, exc.__context__ = tb, ctx
                self._trial_in_flight = False
                self._reason = ""

    # -- the isolate strategy and manual control ---------------------------------------------
    def force_open(self, reason: str) -> None:
        """Open the breaker and hold it open (no trial) until ``reset``: the isolate strategy."""
        with self._changing():
            self._forced = reason
            if self.state != OPEN:
                self._reason = f"forced open: {reason}"
                self._cb.open()

    def reset(self, reason: str = "reset") -> None:
        """Close the breaker and clear its counts (e.g. after the agent was recreated)."""
        with self._changing():
            self._forced = None
            self._trial_in_flight = False
            if self.state != CLOSED:
                self._reason = reason
                self._cb.close()

    # -- pybreaker callback and event delivery ----------------------------------------------
    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the lock for a change, then deliver its events. pybreaker notifies listeners
        before it stores the new state, so ``on_event`` must not run (or raise) inside it; and
        events are observability, so a failing sink is logged and never changes a decision."""
        with self._lock:
            yield
        while self._pending:
            event = self._pending.popleft()
            if self._on_event is not None:
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("breaker %r: on_event failed for %s -> %s", self.name, event.old, event.new)

    def _on_state_change(self, old: str, new: str) -> None:
        if old == new:
            return  # pybreaker re-announces open -> open when open() is called while open
        now = self._clock()
        if new == OPEN:
            self._opened_at = now
        if new != HALF_OPEN:
            self._trial_in_flight = False
        self._pending.append(BreakerEvent(self.name, old, new, now, self._reason or f"{old} -> {new}"))
        self._reason = ""
