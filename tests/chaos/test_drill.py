"""``coordinator.drill`` on a real local Ray: faults of every agent-side kind and kills are
recovered from and the outputs equal the fault-free run; a fault rate no policy survives fails
the verdict; node kills refuse the driver's own node."""

from __future__ import annotations

import json

import pytest
import ray

from coordinator.breakers import BreakerConfig
from coordinator.chaos import ChaosConfig, ChaosError, kill_node
from coordinator.drill import drill_graph, run_drill
from coordinator.team import TeamConfig

pytestmark = pytest.mark.usefixtures("ray_local")


def test_graph_shape():
    tasks = drill_graph(4, 5)
    assert len(tasks) == 20 and len({t.role for t in tasks}) == 4
    assert all(len(t.inputs) == 2 for t in tasks[5:]) and not tasks[0].inputs


def test_agent_side_faults_are_exactly_the_planned_ones_and_recovered(tmp_path):
    """Raised faults and delays are a pure function of (seed, role, task, attempt): the coordinator
    sees exactly the planned raises, retries each, and the outputs equal the fault-free run."""
    chaos = ChaosConfig(seed=0, raise_rate=0.2, delay_rate=0.1, delay_s=0.05)
    plan = chaos.agent_plan()
    expected = 0
    for task in drill_graph():
        attempt = 0
        while plan.decide(task.role, task.name, attempt) == "raise":
            expected, attempt = expected + 1, attempt + 1
    assert expected >= 2, "the seed must plan some raises for this test to mean anything"
    report = run_drill(chaos, tmp_path, run_id="d1", work_s=0.01)
    assert report.passed, report.summary()
    assert report.failures_seen == {"app_error": expected}
    assert report.recoveries == {"retry": expected} and report.dispatches == 20 + expected
    saved = json.loads((tmp_path / "drill.json").read_text())
    assert saved["passed"] is True and saved["tasks"] == 20


def test_agent_kills_are_recovered_and_outputs_equal(tmp_path):
    report = run_drill(ChaosConfig(seed=5, kill_rate=0.2), tmp_path, run_id="d3", work_s=0.01)
    assert report.passed, report.summary()
    assert report.faults_injected.get("kill", 0) >= 1
    assert set(report.failures_seen) <= {"actor_died", "actor_unavailable"}


def test_a_fault_rate_no_policy_survives_fails_the_verdict(tmp_path):
    # Breakers that let a trial through after 0.2 s: the drill's policy waits for each one
    # (retry_when_open) until its 10 calls are spent.
    config = TeamConfig(heartbeat_interval_s=0.5, breaker=BreakerConfig(reset_timeout_s=0.2))
    report = run_drill(ChaosConfig(seed=1, raise_rate=1.0), tmp_path, run_id="d2", layers=2, width=2, work_s=0.0,
                       config=config)
    assert not report.passed
    assert report.error and "escalated" in report.error
    assert "FAILED" in report.summary()


def test_the_drivers_node_is_never_killed():
    with pytest.raises(ChaosError, match="driver"):
        kill_node(ray.get_runtime_context().get_node_id())
