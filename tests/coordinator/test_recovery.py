"""Recovery strategies as values: classify, policy validation, and each strategy's decide() rules.

Each strategy has a test that fails if it is broken or removed. No Ray cluster: classify() builds
Ray's exception objects directly (they need none).
"""

from __future__ import annotations

import pickle
import random

import pytest
import tenacity

from coordinator.errors import AgentForgeError, AgentUnavailableError, CircuitOpenError, ConfigError
from coordinator.recovery import (
    Decision,
    EscalationError,
    Failure,
    FailureKind,
    RecoveryPolicy,
    RestartBudget,
    Strategy,
    TaskRecovery,
    classify,
    decide,
    ray_actor_options,
)

K, S = FailureKind, Strategy


def fail(kind=K.actor_died, executed=None, role="trainer"):
    return Failure("train", role, kind, "boom", executed)


def run(policy, failure, rec, *, now=0.0, seed=0, rng=None, **kw):
    args = {"idempotent": True, "fallback_role": None, "breaker_open": False, "has_checkpoint": False}
    args.update(kw)
    return decide(policy, failure, rec, now=now, rng=rng or random.Random(seed), **args)


# -- classify ------------------------------------------------------------------------------

def test_classify_translates_ray_and_our_exceptions():
    rex = pytest.importorskip("ray.exceptions")
    hexid = "ab" * 14
    cases = [
        (rex.ActorDiedError(), K.actor_died),
        (rex.RayActorError(), K.actor_died),
        (rex.ActorUnavailableError("restarting", None), K.actor_unavailable),  # a RayActorError subclass
        (rex.GetTimeoutError("get timed out"), K.timeout),
        (rex.NodeDiedError("node 1 is gone"), K.node_died),
        (rex.OwnerDiedError(hexid, None, ""), K.actor_died),
        (rex.ObjectLostError(hexid, None, ""), K.actor_died),
        (rex.WorkerCrashedError(), K.actor_died),
        (rex.RayTaskError("handle", "tb", ValueError("bad")).as_instanceof_cause(), K.app_error),
        # the handler raised TimeoutError / CircuitOpenError itself: still an app error
        (rex.RayTaskError("handle", "tb", TimeoutError("inner")).as_instanceof_cause(), K.app_error),
        (rex.RayTaskError("handle", "tb", CircuitOpenError("inner")).as_instanceof_cause(), K.app_error),
        (CircuitOpenError("agent 'x': circuit breaker open"), K.circuit_open),
        (AgentUnavailableError("agent 'x' is gone"), K.actor_unavailable),
        (TimeoutError("deadline"), K.timeout),
        (ValueError("bad payload"), K.app_error),
    ]
    for exc, kind in cases:
        assert classify(exc) is kind, type(exc).__name__


def test_failure_of_sets_executed_and_a_one_line_message():
    rex = pytest.importorskip("ray.exceptions")
    f = Failure.of("t", "r", rex.RayTaskError("handle", "Traceback...\n  line\nValueError: bad", ValueError("bad")))
    assert f.kind is K.app_error and f.executed is True and f.message == "ValueError: bad"
    assert Failure.of("t", "r", CircuitOpenError("open")).executed is False
    assert Failure.of("t", "r", rex.ActorDiedError()).executed is None
    assert Failure.of("t", "r", rex.ActorDiedError(), executed=False).executed is False


# -- the policy ----------------------------------------------------------------------------

def test_policy_validation_names_fields():
    assert RecoveryPolicy(strategies=("retry", "fallback")).strategies == (S.retry, S.fallback, S.escalate)
    assert RecoveryPolicy(strategies=()).strategies == (S.escalate,)
    with pytest.raises(ConfigError, match="repeated: retry"):
        RecoveryPolicy(strategies=("retry", "restart", "retry"))
    with pytest.raises(ConfigError, match="escalate must be the last"):
        RecoveryPolicy(strategies=("escalate", "retry"))
    with pytest.raises(ConfigError) as info:
        RecoveryPolicy(strategies=("retry", "reboot"), retry_attempts=0, restart_on=("upstream",), retry_total_s=0)
    assert {k for k, _ in info.value.problems} == {"strategies.1", "retry_attempts", "restart_on", "retry_total_s"}
    with pytest.raises(ConfigError, match=r"retry_max_backoff_s \(0.1\) must be >= retry_backoff_s \(1.0\)"):
        RecoveryPolicy(retry_backoff_s=1.0, retry_max_backoff_s=0.1)


def test_ray_actor_options_leave_replays_to_us():
    assert ray_actor_options(RecoveryPolicy()) == {"max_restarts": -1, "max_task_retries": 0}
    assert ray_actor_options(RecoveryPolicy(strategies=("retry",))) == {"max_restarts": 0, "max_task_retries": 0}


# -- retry ---------------------------------------------------------------------------------

def test_retry_first_then_budget_then_next_strategy():
    p = RecoveryPolicy(retry_attempts=3)
    rec = TaskRecovery()
    assert [run(p, fail(), rec, now=i).action for i in range(4)] == [S.retry, S.retry, S.restart, S.restart]
    assert "retry skipped: all 3 attempts used" in rec.history[2].reason
    assert rec.attempts(S.retry) == 2 and [d.attempt for d in rec.history[:2]] == [1, 2]


def test_retry_delays_are_tenacitys_exponential_within_max():
    p = RecoveryPolicy(retry_attempts=10, retry_backoff_s=0.1, retry_max_backoff_s=1.0, retry_jitter_s=0.0)
    rec = TaskRecovery()
    delays = [run(p, fail(), rec, now=0.0).delay_s for _ in range(9)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])
    wait = tenacity.wait_exponential(multiplier=0.1, max=1.0)
    state = tenacity.RetryCallState(None, None, (), {})
    for n, d in enumerate(delays, start=1):
        state.attempt_number = n
        assert d == wait(state)


def test_retry_jitter_is_bounded_and_reproducible_under_a_seed():
    p = RecoveryPolicy(retry_attempts=8, retry_backoff_s=0.05, retry_max_backoff_s=2.0, retry_jitter_s=0.05)

    def delays(seed):
        rec, rng = TaskRecovery(), random.Random(seed)
        return [run(p, fail(), rec, rng=rng).delay_s for _ in range(7)]

    a, b, c = delays(7), delays(7), delays(8)
    assert a == b and a != c
    for k, d in enumerate(a):
        base = min(0.05 * 2 ** k, 2.0)
        assert base <= d <= min(base + 0.05, 2.0)
    assert a[-1] == 2.0  # 0.05 * 64 is past the cap


def test_retry_total_time_is_bounded():
    p = RecoveryPolicy(retry_attempts=100, retry_backoff_s=1.0, retry_max_backoff_s=1.0, retry_jitter_s=0.0,
                       retry_total_s=5.0)
    rec = TaskRecovery()
    assert run(p, fail(), rec, now=10.0).action is S.retry  # first failure at 10: the clock starts
    assert run(p, fail(), rec, now=13.5).action is S.retry  # 3.5 + 1.0 < 5
    d = run(p, fail(), rec, now=14.2)  # 4.2 + 1.0 >= 5: tenacity's stop_before_delay
    assert d.action is S.restart and "retry_total_s (5s) would be exceeded" in d.reason


def test_non_idempotent_task_is_retried_only_when_known_not_executed():
    p = RecoveryPolicy()
    for executed in (None, True):
        d = run(p, fail(K.actor_unavailable, executed), TaskRecovery(), idempotent=False)
        assert d.action is S.restart
        assert "retry skipped: task is not idempotent and may have executed" in d.reason
    d = run(p, fail(K.actor_died, executed=False), TaskRecovery(), idempotent=False)
    assert d.action is S.retry


def test_retry_skipped_when_breaker_open_or_kind_not_listed_or_actor_gone_for_good():
    d = run(RecoveryPolicy(), fail(K.timeout), TaskRecovery(), breaker_open=True)
    assert d.action is S.restart and "retry skipped: the agent's circuit breaker is open" in d.reason
    d = run(RecoveryPolicy(retry_on=("timeout",)), fail(K.app_error), TaskRecovery())
    assert d.action is S.escalate and "retry skipped: app_error is not in retry_on" in d.reason
    d = run(RecoveryPolicy(strategies=("retry",)), fail(K.actor_died), TaskRecovery())
    assert d.action is S.escalate and "policy has no restart" in d.reason


def test_retry_when_open_waits_for_the_breakers_trial_call_within_the_budget():
    p = RecoveryPolicy(retry_when_open=True, retry_backoff_s=0.05, retry_jitter_s=0.0, retry_total_s=10.0)
    d = run(p, fail(K.app_error), TaskRecovery(), breaker_open=True, breaker_retry_in_s=4.0)
    assert d.action is S.retry and d.delay_s == pytest.approx(4.0)  # not capped at retry_max_backoff_s
    d = run(p, fail(K.circuit_open, executed=False), TaskRecovery(), breaker_open=True, breaker_retry_in_s=0.01)
    assert d.action is S.retry and d.delay_s == pytest.approx(0.05)  # never sooner than the backoff
    # Held open (isolated): no trial will come, so retry does not apply.
    d = run(p, fail(K.app_error), TaskRecovery(), breaker_open=True, breaker_retry_in_s=None)
    assert d.action is S.escalate and "retry skipped: the agent's circuit breaker is held open" in d.reason
    # The wait counts against retry_total_s like any backoff.
    rec = TaskRecovery(first_failure_at=0.0)
    d = run(p, fail(K.app_error), rec, now=7.0, breaker_open=True, breaker_retry_in_s=4.0)
    assert d.action is S.escalate and "retry_total_s (10s) would be exceeded" in d.reason
    # Off (the default): the breaker's verdict stands.
    d = run(RecoveryPolicy(retry_jitter_s=0.0), fail(K.app_error), TaskRecovery(), breaker_open=True,
            breaker_retry_in_s=4.0)
    assert d.action is S.escalate and "retry skipped: the agent's circuit breaker is open" in d.reason


# -- fallback ------------------------------------------------------------------------------

def test_fallback_goes_to_the_declared_role_once():
    p = RecoveryPolicy(strategies=("fallback", "retry"))
    rec = TaskRecovery()
    d = run(p, fail(K.app_error), rec, fallback_role="trainer_small")
    assert d == Decision(S.fallback, 0.0, "trainer_small", d.reason, 1)
    d = run(p, fail(K.app_error, role="trainer_small"), rec, fallback_role="trainer_small")
    assert d.action is S.retry and "fallback skipped: fallback role 'trainer_small' already used" in d.reason
    d = run(p, fail(K.app_error), TaskRecovery(), fallback_role=None)
    assert d.action is S.retry and "fallback skipped: no fallback role declared" in d.reason


# -- restart -------------------------------------------------------------------------------

def test_restart_intensity_window_is_otp_style_and_shared_per_agent():
    p = RecoveryPolicy(strategies=("restart",), restart_intensity=2, restart_period_s=10.0)
    team: dict[str, RestartBudget] = {}
    a, b = TaskRecovery(restarts=team), TaskRecovery(restarts=team)  # two tasks of one agent
    assert run(p, fail(), a, now=0.0).action is S.restart
    assert run(p, Failure("other", "trainer", K.timeout, "slow"), b, now=1.0).action is S.restart
    d = run(p, fail(), a, now=5.0)  # a third restart within 10 s: intensity spent
    assert d.action is S.escalate and "restart intensity spent (2 restarts of 'trainer' within 10s" in d.reason
    assert run(p, fail(role="judge"), TaskRecovery(restarts=team), now=5.0).action is S.restart  # other agent
    assert run(p, fail(), a, now=10.5).action is S.restart  # t=0 left the window; t=1 is still in it
    assert run(p, fail(), a, now=10.6).action is S.escalate
    assert run(p, fail(), a, now=20.6).action is S.restart


def test_restart_only_for_listed_kinds():
    d = run(RecoveryPolicy(strategies=("restart",)), fail(K.app_error), TaskRecovery())
    assert d.action is S.escalate and "restart skipped: app_error is not in restart_on" in d.reason
    p = RecoveryPolicy(strategies=("restart",), restart_on=("app_error",))
    assert run(p, fail(K.app_error), TaskRecovery()).action is S.restart


# -- isolate -------------------------------------------------------------------------------

def test_isolate_when_breaker_open_or_circuit_open_or_unhealthy():
    p = RecoveryPolicy(strategies=("isolate",))
    assert run(p, fail(K.app_error), TaskRecovery(), breaker_open=True).action is S.isolate
    assert run(p, fail(K.circuit_open, executed=False), TaskRecovery()).action is S.isolate
    assert run(p, fail(K.timeout), TaskRecovery(), unhealthy=True).action is S.isolate
    d = run(p, fail(K.app_error), TaskRecovery())
    assert d.action is S.escalate and "isolate skipped: the agent's breaker is closed" in d.reason


def test_circuit_open_goes_past_retry_to_isolate():
    p = RecoveryPolicy(strategies=("retry", "isolate"))
    d = run(p, fail(K.circuit_open, executed=False), TaskRecovery(), breaker_open=True)
    assert d.action is S.isolate and "retry skipped: the agent's circuit breaker is open" in d.reason
    # Refused while half-open (its one trial busy): known not executed, so a later retry is fine.
    d = run(p, fail(K.circuit_open, executed=False), TaskRecovery(), breaker_open=False, idempotent=False)
    assert d.action is S.retry and d.delay_s > 0


# -- rollback ------------------------------------------------------------------------------

def test_rollback_needs_a_checkpoint_and_is_limited():
    p = RecoveryPolicy(strategies=("rollback",), rollback_max=2)
    d = run(p, fail(K.app_error), TaskRecovery(), has_checkpoint=False)
    assert d.action is S.escalate and "rollback skipped: the team has no last good checkpoint" in d.reason
    rec = TaskRecovery()
    actions = [run(p, fail(K.app_error), rec, has_checkpoint=True).action for _ in range(3)]
    assert actions == [S.rollback, S.rollback, S.escalate]
    assert "rollback_max (2) used" in rec.history[-1].reason


# -- escalate and the whole walk -----------------------------------------------------------

def test_policy_order_is_respected_and_escalate_is_the_last_resort():
    p = RecoveryPolicy(strategies=("rollback", "fallback", "retry", "restart", "isolate"),
                       retry_attempts=2, restart_intensity=1)
    rec = TaskRecovery()
    kw = {"fallback_role": "alt", "has_checkpoint": True}
    actions = [run(p, fail(), rec, now=i, **kw).action for i in range(6)]
    assert actions == [S.rollback, S.fallback, S.retry, S.restart, S.escalate, S.escalate]
    last = rec.history[-1]
    for s in ("rollback", "fallback", "retry", "restart", "isolate"):
        assert f"{s} skipped:" in last.reason


def test_decisions_are_deterministic():
    p = RecoveryPolicy(strategies=("retry", "fallback", "restart", "rollback"))

    def trail(seed):
        rec, rng = TaskRecovery(), random.Random(seed)
        return [run(p, fail(), rec, now=i * 0.1, rng=rng, fallback_role="alt", has_checkpoint=True) for i in range(9)]

    assert trail(3) == trail(3)


def test_upstream_failures_are_not_decided():
    with pytest.raises(ValueError, match="upstream"):
        run(RecoveryPolicy(), fail(K.upstream), TaskRecovery())


def test_escalation_error_is_structured_one_line_and_picklable():
    p = RecoveryPolicy(strategies=("retry",), retry_attempts=2)
    rec = TaskRecovery()
    f = Failure("train", "trainer", K.app_error, "ValueError: loss is nan\nmore")
    while (d := run(p, f, rec)).action is not S.escalate:
        pass
    err = EscalationError.from_decision("baking", f, d, rec)
    assert isinstance(err, AgentForgeError)
    assert (err.team, err.task, err.role, err.kind) == ("baking", "train", "trainer", K.app_error)
    assert [x.action for x in err.history] == [S.retry, S.escalate]
    msg = str(err)
    assert "\n" not in msg and msg.startswith("team 'baking': task 'train' (role 'trainer') escalated after app_error")
    assert "tried: retry" in msg and "retry skipped: all 2 attempts used" in msg
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == msg and copy.history == err.history
