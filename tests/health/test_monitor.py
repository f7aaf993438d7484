"""The health monitor on a real local Ray: heartbeats, missed beats -> unhealthy -> callback, a
beat bounded by its timeout, restarts seen, the background thread; and the report, health log
and W&B keys with an injected clock."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from actors.base import TeamSpec, spawn, spawn_team, wait_ready
from actors.roles import register_role
from health.monitor import HealthMonitor, health_paths

NAMESPACE = "agentforge-tests"


@register_role("test-slow-start")
class SlowStartRole:
    """Sleeps ``config["sleep_s"]`` in setup: its actor answers nothing until then."""

    def setup(self, context):
        time.sleep(float(context.config.get("sleep_s", 0)))

    def handle(self, task, payload, inputs):
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        return None


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def wait_dead(handle, timeout_s: float = 30.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.heartbeat.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.02)
    raise AssertionError("actor still answers after ray.kill")


@pytest.fixture(scope="module")
def run_id(ray_local):
    return f"m{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def team(run_id, tmp_path_factory):
    spec = TeamSpec(name="mon", agents=[{"role": r, "num_cpus": 0.25} for r in ("echo", "accumulator", "noop")])
    handles = spawn_team(spec, run_id=run_id, checkpoint_root=tmp_path_factory.mktemp("ckpt"), namespace=NAMESPACE)
    wait_ready(handles)
    return handles


def test_beats_answer_and_restarts_are_seen(team, tmp_path):
    import ray

    events, _ = health_paths(tmp_path / "06_baking")
    mon = HealthMonitor("mon", team, interval_s=0.5, log_path=events)
    assert mon.beat_once(5.0) == {"echo": True, "accumulator": True, "noop": True}
    rep = mon.report()["agents"]
    assert all(rep[r]["beats"] == 1 and rep[r]["healthy"] and rep[r]["missed_beats"] == 0 for r in team)
    old_pid = rep["accumulator"]["pid"]
    ray.kill(team["accumulator"], no_restart=False)
    deadline = time.monotonic() + 30
    while mon.report()["agents"]["accumulator"]["restarts_seen"] == 0:
        assert time.monotonic() < deadline, "restart not seen"
        mon.beat_once(1.0)
    a = mon.report()["agents"]["accumulator"]
    assert a["pid"] != old_pid and a["num_restarts"] >= 1 and a["healthy"]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    seen = [e for e in lines if e["event"] == "restart_seen"]
    assert seen and seen[0]["old_pid"] == old_pid and seen[0]["team"] == "mon" and "time" in seen[0]


def test_a_beat_never_waits_past_its_timeout_and_a_late_answer_heals(run_id, tmp_path):
    import ray

    slow = spawn({"role": "test-slow-start", "num_cpus": 0.25, "config": {"sleep_s": 1.0}}, run_id=run_id,
                 team="slow", checkpoint_root=tmp_path, namespace=NAMESPACE)
    healed, sick = [], []
    mon = HealthMonitor("slow", {"slow": slow}, interval_s=0.3, missed_beats_unhealthy=1,
                        on_unhealthy=lambda r, e: sick.append(r), on_healthy=lambda r, e: healed.append(r))
    t0 = time.monotonic()
    assert mon.beat_once(0.3) == {"slow": False}
    assert time.monotonic() - t0 < 0.3 + 0.25
    assert sick == ["slow"] and not mon.is_healthy("slow")
    deadline = time.monotonic() + 30
    while not mon.beat_once(0.5).get("slow"):
        assert time.monotonic() < deadline
    assert healed == ["slow"] and mon.is_healthy("slow")
    # The unanswered heartbeat was awaited again, not resent: the actor answered one beat so far.
    assert ray.get(slow.heartbeat.remote())["seq"] == 2
    ray.kill(slow)


def test_background_thread_beats_alongside_the_caller(team):
    mon = HealthMonitor("mon", team, interval_s=0.1)
    with mon:
        deadline = time.monotonic() + 20
        while min(a["beats"] for a in mon.report()["agents"].values()) < 3:
            mon.beat_once(0.5)  # the coordinator's loop may beat too
            assert time.monotonic() < deadline
    assert not mon._thread.is_alive()
    assert all(a["healthy"] for a in mon.report()["agents"].values())


def test_killed_agent_misses_beats_then_turns_unhealthy_once(team, tmp_path):
    import ray

    victim = team["noop"]  # the last test of the team's agents: this one is killed for good
    calls = []
    mon = HealthMonitor("mon", {"noop": victim}, interval_s=0.5, missed_beats_unhealthy=3,
                        on_unhealthy=lambda role, event: calls.append((role, event)), log_path=tmp_path / "ev.jsonl")
    assert mon.beat_once(5.0) == {"noop": True}
    ray.kill(victim, no_restart=True)
    wait_dead(victim)  # ray.kill is asynchronous: a beat sent right after it may still be answered
    for i in range(3):
        t0 = time.monotonic()
        assert mon.beat_once(1.0) == {"noop": False}
        assert time.monotonic() - t0 < 1.5
        assert (len(calls) == 1) == (i == 2)  # exactly at the third consecutive miss
    role, event = calls[0]
    assert role == "noop" and event["event"] == "unhealthy" and event["reason"] == "dead" and event["missed_beats"] == 3
    assert not mon.is_healthy("noop")
    mon.beat_once(1.0)
    assert len(calls) == 1  # no repeat while it stays unhealthy
    kinds = [json.loads(line)["event"] for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert kinds == ["missed_beat", "missed_beat", "missed_beat", "unhealthy"]
    rep = mon.report()
    assert rep["agents"]["noop"]["missed_beats"] == 4 and rep["summary"]["unhealthy_agents"] == ["noop"]


def test_report_health_log_and_wandb_keys(tmp_path):
    clock = Clock(100.0)
    events, report_path = health_paths(tmp_path / "07_adas")
    mon = HealthMonitor("adas", {}, clock=clock, window_s=60.0, sla_target=0.9, log_path=events)
    lat = {"planner": [0.01, 0.02, 0.03, 0.04], "critic": [0.1, 0.5]}
    for role, values in lat.items():
        for i, v in enumerate(values):
            mon.record_call(role, ok=not (role == "critic" and i == 1), latency_s=v, kind="timeout")
    mon.set_breaker("critic", "open")
    mon.set_breaker("critic", "open")  # no change, no event
    mon.record_recovery("critic", "retry", attempt=1)
    mon.record_recovery("critic", "isolate", reason="breaker open")
    rep = mon.report()
    c, p, s = rep["agents"]["critic"], rep["agents"]["planner"], rep["summary"]
    assert (c["calls"], c["failures"], c["failures_by_kind"], c["success_ratio"]) == (2, 1, {"timeout": 1}, 0.5)
    assert c["breaker"] == "open" and c["recoveries"] == {"retry": 1, "isolate": 1} and c["sla_met"] is False
    assert p["p99_latency_s"] == pytest.approx(np.percentile(lat["planner"], 99)) and p["sla_met"] is True
    assert (s["calls"], s["failures"], s["success_ratio"]) == (6, 1, pytest.approx(5 / 6))
    assert s["p50_latency_s"] == pytest.approx(np.percentile(lat["planner"] + lat["critic"], 50))
    assert s["sla_violations"] == ["critic"] and s["recoveries"] == {"retry": 1, "isolate": 1}
    sha = mon.write_report(report_path)
    written = json.loads(report_path.read_text())
    assert written["summary"] == json.loads(json.dumps(s)) and written["team"] == "adas" and len(sha) == 64
    assert sorted(p.name for p in report_path.parent.iterdir()) == ["events.jsonl", "report.json"]  # no temp files
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds == ["breaker", "recovery", "recovery"]
    wb = mon.wandb_metrics()
    assert wb["health/adas/critic/success_ratio"] == 0.5 and wb["health/adas/success_ratio"] == pytest.approx(5 / 6)
    assert wb["health/adas/planner/p99_latency_s"] == pytest.approx(p["p99_latency_s"])
    assert wb["health/adas/critic/circuit_breaker_status"] == 2.0 and wb["health/adas/recoveries/isolate"] == 1.0
    assert all(k.startswith("health/adas/") and isinstance(v, float) for k, v in wb.items())
    clock.t += 61  # the window empties; cumulative counts stay, windowed figures become None
    later = mon.report()
    assert later["summary"]["calls"] == 6 and later["summary"]["success_ratio"] is None
    assert "health/adas/success_ratio" not in mon.wandb_metrics()
    with pytest.raises(TypeError, match="'event' key"):
        mon.record_event({"no": "name"})
    with pytest.raises(ValueError, match="unknown breaker state"):
        mon.set_breaker("critic", "ajar")
