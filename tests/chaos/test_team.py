"""The agent runtime on a real local Ray: every recovery strategy, and random agent kills.

Each test fails if its strategy is broken or removed: it asserts both the outcome (outputs,
states) and the decision the coordinator took (from TeamResult.decisions / dispatch counts).
"""

from __future__ import annotations

import json

import pytest
import ray

import tests.chaos.team_roles  # noqa: F401 - registers the test roles
from actors.base import AgentSpec, TeamSpec, make_request, read_reply
from coordinator.breakers import BreakerConfig
from coordinator.chaos import ChaosConfig
from coordinator.dag import TaskSpec
from coordinator.recovery import EscalationError, RecoveryPolicy, Strategy
from coordinator.team import Team, TeamConfig

pytestmark = pytest.mark.usefixtures("ray_local")


def agents(*roles: str) -> tuple[AgentSpec, ...]:
    return tuple(AgentSpec(role=r, num_cpus=0.25) for r in roles)


def policy(*strategies: str, **kw) -> RecoveryPolicy:
    return RecoveryPolicy(strategies=tuple(Strategy(s) for s in strategies), retry_backoff_s=0.01,
                          retry_jitter_s=0.01, **kw)


def run_team(tmp_path, name, roles, tasks, *, config=None, run_id="t", chaos=None):
    spec = TeamSpec(name=name, agents=agents(*roles), tasks=tuple(tasks))
    with Team(spec, run_id=run_id, work_dir=tmp_path / name, config=config or TeamConfig(heartbeat_interval_s=0.5),
              chaos=chaos) as team:
        result = team.run()
        extra = {role: team.agents[role] for role in roles}
        counts = {}
        if "t-counter" in roles:
            counts["t-counter"] = read_reply(ray.get(extra["t-counter"].handle.remote(make_request("count"))))["output"]
    return result, counts


def graph20() -> list[TaskSpec]:
    """Four layers of five tasks; each task consumes two tasks of the layer before."""
    tasks, workers = [], ["t-w1", "t-w2", "t-w3", "t-w4"]
    for layer in range(4):
        for i in range(5):
            inputs = () if layer == 0 else (f"L{layer - 1}-{i}", f"L{layer - 1}-{(i + 1) % 5}")
            tasks.append(TaskSpec(name=f"L{layer}-{i}", role=workers[(layer * 5 + i) % 4], inputs=inputs,
                                  payload=layer * 10 + i, timeout_s=30.0))
    return tasks


@pytest.mark.slow
def test_random_agent_kills_never_change_the_outputs(tmp_path):
    """(a) 20-task graph, agents killed at random (5 seeds): every task completes, outputs equal.
    Default-run sibling: tests/chaos/test_nodes.py's random kills across nodes (one seed)."""
    roles = ("t-w1", "t-w2", "t-w3", "t-w4")
    clean, _ = run_team(tmp_path, "clean", roles, graph20())
    assert clean.succeeded and len(clean.outputs) == 20
    killed_total = recovered_total = 0
    for seed in range(5):
        cfg = TeamConfig(heartbeat_interval_s=0.5, breaker=BreakerConfig(reset_timeout_s=2.0),
                         policy=policy("retry", "restart", retry_attempts=6, retry_when_open=True))
        result, _ = run_team(tmp_path, f"chaos{seed}", roles, graph20(), config=cfg, run_id=f"c{seed}",
                             chaos=ChaosConfig(kill_rate=0.15, seed=seed))
        assert result.succeeded, (seed, result.states, result.causes)
        assert result.outputs == clean.outputs, f"seed {seed}: outputs differ from the fault-free run"
        kills = [f for f in result.faults if f["fault"] == "kill"]
        seen = sum(1 for d in result.decisions if d["kind"] in ("actor_died", "actor_unavailable"))
        assert kills or not seen, "agent failures only come from the injected kills"
        killed_total, recovered_total = killed_total + len(kills), recovered_total + seen
    assert killed_total > 0 and recovered_total > 0, "the chaos kills must really have happened and been recovered"


def test_retry_replays_a_failed_idempotent_task(tmp_path):
    tasks = [TaskSpec(name="x", role="t-fail-once", payload={"dir": str(tmp_path), "value": 5}, policy=policy("retry"))]
    result, _ = run_team(tmp_path, "retry", ["t-fail-once"], tasks)
    assert result.outputs == {"x": 5} and result.dispatches == {"x": 2}
    assert [d["action"] for d in result.decisions] == ["retry"]


def test_fallback_runs_the_task_on_the_declared_role(tmp_path):
    tasks = [TaskSpec(name="x", role="t-broken", payload=7, fallback_role="t-sum", policy=policy("fallback"))]
    result, _ = run_team(tmp_path, "fallback", ["t-broken", "t-sum"], tasks)
    assert result.outputs == {"x": 7}
    assert [d["action"] for d in result.decisions] == ["fallback"]


def test_fallback_payload_runs_a_simpler_algorithm_on_the_same_role(tmp_path):
    """A task that declares a simpler algorithm (``fallback_payload``) falls back to it, once."""
    d = str(tmp_path)
    tasks = [TaskSpec(name="x", role="t-fail-n", payload={"dir": d, "fails": 99, "value": 1},
                      fallback_payload={"dir": d, "fails": 0, "value": 2}, policy=policy("fallback"))]
    result, _ = run_team(tmp_path, "fallback-payload", ["t-fail-n"], tasks)
    assert result.outputs == {"x": 2} and result.dispatches == {"x": 2}
    (decision,) = result.decisions
    assert decision["action"] == "fallback" and "to role 't-fail-n'" in decision["reason"]


def test_restart_recreates_a_crashed_agent_and_replays(tmp_path):
    tasks = [TaskSpec(name="x", role="t-crash-once", payload={"dir": str(tmp_path), "value": 3}, policy=policy("restart"))]
    result, _ = run_team(tmp_path, "restart", ["t-crash-once"], tasks)
    assert result.outputs == {"x": 3} and result.dispatches == {"x": 2}
    (decision,) = result.decisions
    assert decision["action"] == "restart" and decision["kind"] in ("actor_died", "actor_unavailable")


def test_isolate_opens_the_breaker_and_keeps_independent_tasks_going(tmp_path):
    """(b) an agent that always fails: breaker opens after fail_max, isolate, result degraded."""
    tasks = [TaskSpec(name=f"x{i}", role="t-broken", payload=i) for i in range(4)]
    tasks += [TaskSpec(name=f"y{i}", role="t-sum", payload=i) for i in range(4)]
    tasks += [TaskSpec(name="needs-x", role="t-sum", inputs=("x0",))]
    cfg = TeamConfig(heartbeat_interval_s=0.5, breaker=BreakerConfig(fail_max=3, reset_timeout_s=60),
                     policy=policy("retry", "isolate", retry_attempts=10))
    result, _ = run_team(tmp_path, "isolate", ["t-broken", "t-sum"], tasks, config=cfg)
    assert {f"y{i}": i for i in range(4)}.items() <= result.outputs.items(), "independent tasks completed"
    assert all(result.states[f"x{i}"] == "isolated" for i in range(4))
    assert result.states["needs-x"] == "upstream_failed"
    assert result.degraded and "t-broken" in result.degraded and "isolated" in result.degraded
    broken = [d["action"] for d in result.decisions if d["role"] == "t-broken"]
    assert broken[:3] == ["retry", "retry", "isolate"], "the breaker opened on the 3rd failure (fail_max=3)"
    report = json.loads((tmp_path / "isolate" / "health" / "report.json").read_text())
    assert report, "a health report is written"


def test_retry_when_open_waits_for_the_breakers_trial_and_the_task_completes(tmp_path):
    """The breaker opens on the 3rd failure; the task waits for its trial call (0.3 s later),
    the trial fails and re-opens it, the next trial succeeds and closes it."""
    tasks = [TaskSpec(name="x", role="t-fail-n", payload={"dir": str(tmp_path), "fails": 4, "value": 9},
                      policy=policy("retry", retry_attempts=10, retry_when_open=True))]
    cfg = TeamConfig(heartbeat_interval_s=0.5, breaker=BreakerConfig(fail_max=3, reset_timeout_s=0.3))
    result, _ = run_team(tmp_path, "wait-open", ["t-fail-n"], tasks, config=cfg)
    assert result.outputs == {"x": 9} and result.dispatches == {"x": 5}
    assert [d["action"] for d in result.decisions] == ["retry"] * 4
    events = [json.loads(line) for line in (tmp_path / "wait-open" / "health" / "events.jsonl").read_text().splitlines()]
    moves = [e["new"] for e in events if e.get("event") == "breaker"]
    assert moves == ["open", "half-open", "open", "half-open", "closed"], moves


def test_rollback_restores_the_checkpoint_and_replays_only_later_tasks(tmp_path):
    """(d) rollback: restore the last good checkpoint, replay only the tasks after it (counted)."""
    d = {"dir": str(tmp_path)}
    tasks = [TaskSpec(name="a1", role="t-counter", payload=1, checkpoint=True),
             TaskSpec(name="a2", role="t-counter", payload=2, inputs=("a1",)),
             TaskSpec(name="b3", role="t-fail-once", payload={**d, "value": 10}, inputs=("a2",),
                      policy=policy("rollback"))]
    result, counts = run_team(tmp_path, "rollback", ["t-counter", "t-fail-once"], tasks)
    assert result.outputs == {"a1": 1, "a2": 3, "b3": 13}
    assert result.dispatches == {"a1": 1, "a2": 2, "b3": 2}, "only the tasks after the checkpoint replay"
    assert counts["t-counter"] == 2, "the counter was restored to its checkpoint (1), then ran a2 again"
    assert [x["action"] for x in result.decisions] == ["rollback"]


def test_escalate_stops_the_team_with_a_structured_error(tmp_path):
    """(e) escalate: a structured error naming team, task, role and failure; the actors are gone."""
    tasks = [TaskSpec(name="x", role="t-broken", policy=policy("escalate"))]
    spec = TeamSpec(name="esc", agents=agents("t-broken"), tasks=tuple(tasks))
    team = Team(spec, run_id="t", work_dir=tmp_path / "esc", config=TeamConfig(heartbeat_interval_s=0.5))
    team.start()
    handle = team.agents["t-broken"]
    with pytest.raises(EscalationError) as info:
        team.run()
    err = info.value
    assert (err.team, err.task, err.role, err.kind.value) == ("esc", "x", "t-broken", "app_error")
    assert team.last_result.states == {"x": "failed"} and team.last_result.dispatches == {"x": 1}
    assert "\n" not in str(err)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.info.remote(), timeout=30)
