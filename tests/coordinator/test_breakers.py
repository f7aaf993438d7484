"""AgentBreaker: pybreaker's counting, gated for asynchronous calls, on a fake clock (no Ray)."""

from __future__ import annotations

import time

import pytest

from coordinator.breakers import AgentBreaker, BreakerConfig, BreakerEvent
from coordinator.errors import CircuitOpenError, ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(fail_max=3, reset=10.0, success_threshold=1):
    clock, events = Clock(), []
    cfg = BreakerConfig(fail_max=fail_max, reset_timeout_s=reset, success_threshold=success_threshold)
    return AgentBreaker("run1/team/trainer", cfg, on_event=events.append, clock=clock), clock, events


def fail(b: AgentBreaker, n: int = 1) -> None:
    for i in range(n):
        assert b.allow()
        b.record_failure(ValueError(f"boom {i}"))


def test_config_is_validated():
    assert BreakerConfig() == BreakerConfig(fail_max=5, reset_timeout_s=30.0, success_threshold=1)
    with pytest.raises(ConfigError) as info:
        BreakerConfig(fail_max=0, reset_timeout_s=-1, success_threshold=0, nope=1)
    assert {k for k, _ in info.value.problems} == {"fail_max", "reset_timeout_s", "success_threshold", "nope"}


def test_opens_after_exactly_fail_max_consecutive_failures():
    b, _, events = make(fail_max=3)
    fail(b, 2)
    assert b.state == "closed" and b.fail_counter == 2 and events == []
    fail(b, 1)
    assert b.state == "open"
    assert events == [BreakerEvent("run1/team/trainer", "closed", "open", 100.0,
                                   "3 consecutive failures (last: ValueError: boom 0)")]


def test_a_success_resets_the_count():
    b, _, _ = make(fail_max=3)
    fail(b, 2)
    assert b.allow()
    b.record_success()
    assert b.fail_counter == 0
    fail(b, 2)
    assert b.state == "closed"  # 2 + 2 failures, but never 3 in a row
    fail(b, 1)
    assert b.state == "open"


def test_open_fails_fast_until_reset_timeout():
    b, clock, _ = make(fail_max=1, reset=10.0)
    fail(b)
    assert not b.allow()
    clock.t += 4.0
    with pytest.raises(CircuitOpenError, match=r"'run1/team/trainer'.*is open \(last failure: ValueError: boom 0\); trial call in 6\.00s") as info:
        b.check()
    assert info.value.agent == "run1/team/trainer" and info.value.retry_in_s == pytest.approx(6.0)
    assert b.seconds_until_trial() == pytest.approx(6.0)
    clock.t += 5.99
    assert not b.allow() and b.state == "open"


def test_after_reset_timeout_exactly_one_trial_and_success_closes():
    b, clock, events = make(fail_max=1, reset=10.0)
    fail(b)
    clock.t += 10.0
    assert b.allow()  # the trial
    assert b.state == "half-open"
    assert not b.allow() and not b.allow()  # only one trial in flight
    with pytest.raises(CircuitOpenError, match="trial call is still in flight"):
        b.check()
    clock.t += 1.0
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()
    assert [(e.old, e.new, e.at) for e in events] == [
        ("closed", "open", 100.0), ("open", "half-open", 110.0), ("half-open", "closed", 111.0)]
    assert events[1].reason.startswith("reset timeout 10s elapsed") and events[2].reason == "trial call succeeded"


def test_trial_failure_reopens_and_restarts_the_timer():
    b, clock, events = make(fail_max=2, reset=10.0)
    fail(b, 2)
    clock.t += 10.0
    assert b.allow()
    clock.t += 2.0
    b.record_failure(TimeoutError("deadline 5s passed"))
    assert b.state == "open"
    assert events[-1] == BreakerEvent("run1/team/trainer", "half-open", "open", 112.0,
                                      "trial call failed: TimeoutError: deadline 5s passed")
    clock.t += 9.0
    assert not b.allow()  # the timer restarted at the trial's failure
    clock.t += 1.0
    assert b.allow() and b.state == "half-open"


def test_success_threshold_needs_that_many_trials_one_at_a_time():
    b, clock, events = make(fail_max=1, reset=1.0, success_threshold=2)
    fail(b)
    clock.t += 1.0
    assert b.allow() and not b.allow()
    b.record_success()
    assert b.state == "half-open"  # one success is not enough
    assert b.allow() and not b.allow()  # the second trial
    b.record_success()
    assert b.state == "closed"
    assert [e.new for e in events] == ["open", "half-open", "closed"]


def test_outcomes_reported_while_open_are_ignored():
    b, _, events = make(fail_max=1, reset=10.0)
    assert b.allow() and b.allow()  # two calls in flight
    b.record_failure(RuntimeError("first"))
    b.record_success()  # the other call's late result: not a trial
    b.record_failure(RuntimeError("late"))
    assert b.state == "open" and len(events) == 1


def test_record_failure_leaves_the_callers_exception_intact():
    b, _, _ = make(fail_max=1)
    try:
        raise KeyError("original")
    except KeyError as e:
        exc = e
    tb = exc.__traceback__
    b.allow()
    b.record_failure(exc)  # the tripping call: pybreaker re-raises it, we swallow only it
    assert exc.__traceback__ is tb and b.state == "open"


def test_force_open_holds_until_reset():
    b, clock, events = make(fail_max=5, reset=1.0)
    b.force_open("missed 3 heartbeats")
    assert b.state == "open" and b.forced == "missed 3 heartbeats"
    clock.t += 1000.0
    assert not b.allow() and b.seconds_until_trial() is None
    with pytest.raises(CircuitOpenError, match="isolated: missed 3 heartbeats"):
        b.check()
    b.reset("agent recreated")
    assert b.state == "closed" and b.allow() and b.forced is None
    assert [(e.old, e.new, e.reason) for e in events] == [
        ("closed", "open", "forced open: missed 3 heartbeats"), ("open", "closed", "agent recreated")]


def test_real_clock_and_pybreaker_together():
    """No fake clock: a tiny reset timeout and a short sleep, end to end."""
    events: list[BreakerEvent] = []
    b = AgentBreaker("a", BreakerConfig(fail_max=2, reset_timeout_s=0.05), on_event=events.append)
    fail(b, 2)
    assert not b.allow()
    time.sleep(0.08)
    b.check()  # the trial is allowed: no raise
    b.record_success()
    assert b.state == "closed" and [e.new for e in events] == ["open", "half-open", "closed"]
    assert events[0].at <= events[1].at <= events[2].at


def test_on_event_sees_the_stored_state_and_a_failing_sink_changes_nothing(caplog):
    seen = []

    def on_event(e: BreakerEvent) -> None:
        seen.append((e.new, b.state))
        raise RuntimeError("a broken metrics sink")

    clock = Clock()
    b = AgentBreaker("a", BreakerConfig(fail_max=1, reset_timeout_s=1.0), on_event=on_event, clock=clock)
    assert b.allow()
    b.record_failure(ValueError("boom"))
    assert seen == [("open", "open")] and b.state == "open"  # delivered after pybreaker stored it
    assert "on_event failed for closed -> open" in caplog.text
    clock.t += 1.0
    assert b.allow() and not b.allow()  # the trial is granted once, despite the sink
    b.record_success()
    assert seen == [("open", "open"), ("half-open", "half-open"), ("closed", "closed")]
