"""Our custom metrics read back from the node's Prometheus endpoint, and the named agents listed by
the State API (what `ray list actors` and the dashboard's Actors view show), on a real local Ray
with its dashboard and a metrics export port."""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid

import pytest

from actors.base import DEFAULT_NAMESPACE, actor_name, spawn, wait_ready
from health.metrics import METRIC_NAMES, Metrics
from health.monitor import HealthMonitor


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serves_this_session(port: int, session: str, wait_s: float) -> bool:
    """Whether the endpoint on ``port`` serves metrics of this Ray session within ``wait_s``
    (Ray labels every metric with its SessionName)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                if f'SessionName="{session}"' in resp.read().decode():
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def ray_metrics():
    """A local Ray that exports metrics every second on a free port, with the dashboard (State API).

    The endpoint must serve this session's metrics before the tests scrape it: a metrics agent
    of an earlier Ray instance still shutting down can hold the port, and the new agent then
    fails to bind it silently (Ray deflaked its own metrics tests the same way, ray-project/ray
    PR 63677); then Ray is restarted on another port, up to three times."""
    import ray

    for _attempt in range(3):
        if ray.is_initialized():
            ray.shutdown()
        port = free_port()
        context = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=free_port(), _metrics_export_port=port, log_to_driver=False,
                           namespace="agentforge-tests",
                           # Ray exports every 10 s by default; 1 s keeps the test short (src: ray/_private/
                           # telemetry/open_telemetry_metric_recorder.py, "max(metrics_report_interval_ms, 1000)").
                           _system_config={"metrics_report_interval_ms": 1000})
        if _serves_this_session(port, ray._private.worker.global_worker.node.session_name, 30.0):
            break
    else:
        ray.shutdown()
        pytest.fail("three local Ray instances in a row did not serve their metrics on the export port")
    # Other Ray instances may run on this machine: the State API gets this one's dashboard URL.
    yield {"metrics_port": port, "dashboard_url": f"http://{context.dashboard_url}"}
    ray.shutdown()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from the node's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def find(samples, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    values = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    return sum(values) if values else None


def test_names_are_valid_prometheus_names_that_ray_keeps():
    m = Metrics.get()
    assert m is Metrics.get()
    for metric in (m.calls, m.failures, m.recoveries, m.breaker_state, m.agent_healthy, m.latency):
        assert not metric._discard_metric  # Ray drops (with a warning only) a name it rejects
    assert set(METRIC_NAMES.values()) == {metric.info["name"] for metric in (
        m.calls, m.failures, m.recoveries, m.breaker_state, m.agent_healthy, m.latency)}
    with pytest.raises(ValueError, match="unknown breaker state"):
        m.breaker("t", "r", "ajar")


def test_custom_metrics_reach_the_prometheus_endpoint(ray_metrics):
    team = f"team{uuid.uuid4().hex[:6]}"
    mon = HealthMonitor(team, {}, window_s=60.0)
    for latency in (0.002, 0.004, 0.02):
        mon.record_call("planner", ok=True, latency_s=latency)
    for _ in range(2):
        mon.record_call("planner", ok=False, latency_s=1.5, kind="timeout")
    mon.record_recovery("planner", "retry")
    mon.set_breaker("planner", "open")
    expected = {
        ("ray_agentforge_agent_calls_total", "ok"): 3.0,
        ("ray_agentforge_agent_calls_total", "timeout"): 2.0,
    }
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(ray_metrics["metrics_port"])
        got = {key: find(samples, key[0], team=team, role="planner", outcome=key[1]) for key in expected}
        others = (find(samples, "ray_agentforge_agent_failures_total", team=team, kind="timeout"),
                  find(samples, "ray_agentforge_recoveries_total", team=team, strategy="retry"),
                  find(samples, "ray_agentforge_breaker_state", team=team, role="planner"),
                  find(samples, "ray_agentforge_task_latency_seconds_count", team=team, role="planner"),
                  find(samples, "ray_agentforge_task_latency_seconds_bucket", team=team, role="planner", le="0.005"))
        if got == expected and others == (2.0, 1.0, 2.0, 5.0, 2.0):
            break
        assert time.monotonic() < deadline, f"metrics not exported as expected: {got}, {others}"
        time.sleep(0.5)


def test_named_agents_are_listed_by_the_state_api(ray_metrics, tmp_path):
    from ray.util.state import list_actors

    from cluster.connect import DEFAULT_NAMESPACE as CLUSTER_NAMESPACE

    assert DEFAULT_NAMESPACE == CLUSTER_NAMESPACE
    run_id = f"s{uuid.uuid4().hex[:6]}"
    handle = spawn({"role": "noop", "num_cpus": 0.25}, run_id=run_id, team="listed", checkpoint_root=tmp_path)
    wait_ready({"noop": handle})
    name = actor_name(run_id, "listed", "noop")
    alive = list_actors(address=ray_metrics["dashboard_url"], filters=[("name", "=", name), ("state", "=", "ALIVE")],
                        detail=True)
    assert len(alive) == 1 and alive[0].ray_namespace == DEFAULT_NAMESPACE and alive[0].class_name == "Agent"
    assert alive[0].is_detached is False
