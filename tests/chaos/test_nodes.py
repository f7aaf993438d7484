"""(c) A node removed mid-run on a 3-node Ray cluster: its agents restart elsewhere, the run completes.

The node is killed the way ``chaos.node_kill_rate`` does it on a real cluster (its raylet is shut
down without grace, as Ray's own RayletKiller does), through ``agentforge drill``'s code path.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from cluster.connect import connect
from cluster.local import LocalCluster
from coordinator.chaos import ChaosConfig
from coordinator.drill import run_drill
from tests.cluster.conftest import fresh_driver, refresh_ray_auth  # noqa: F401 - fresh_driver is a fixture

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("fresh_driver")]

MiB = 1024 * 1024


@pytest.fixture
def three_nodes() -> Iterator[LocalCluster]:
    """A head without CPUs (the driver's node, never killed) and two 2-CPU workers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        refresh_ray_auth()
        with LocalCluster(num_nodes=3, cpus_per_node=2, head_cpus=0, object_store_memory=80 * MiB) as cluster:
            yield cluster
    refresh_ray_auth()


def test_a_node_killed_mid_run_moves_its_agents_and_the_run_completes(three_nodes, tmp_path):
    connect(three_nodes.address)
    workers = {n.node_id for n in three_nodes.worker_nodes}
    # node_kill_rate=1: the first dispatch kills the node of the agent it went to; once only.
    chaos = ChaosConfig(node_kill_rate=1.0, max_node_kills=1, seed=0)
    report = run_drill(chaos, tmp_path, run_id="nodes", work_s=0.05)

    assert report.passed, report.summary()
    assert report.faults_injected == {"node_kill": 1}, report.faults
    killed = report.faults[0]["node_id"]
    assert killed in workers
    assert not next(n for n in ray.nodes() if n["NodeID"] == killed)["Alive"], "the node really died"
    assert set(report.nodes_clean) == workers, "SPREAD put agents on both workers in the fault-free run"
    # Every task dispatched after the node died ran on the surviving worker.
    late = {t: n for t, n in report.task_nodes.items() if t.startswith(("L2-", "L3-"))}
    assert late and set(late.values()) == workers - {killed}
    # The failure was seen and recovered (restart brings the agents back on the other node).
    lost = {"actor_died", "actor_unavailable", "node_died", "timeout"}
    assert lost & set(report.failures_seen), report.failures_seen
    assert report.recoveries.get("restart", 0) + report.recoveries.get("retry", 0) >= 1
