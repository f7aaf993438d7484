"""Chaos on a 3-node Ray cluster (a head without CPUs and two workers), through ``agentforge
drill``'s code path: (a) random agent kills and raised faults with agents spread over both
workers; (c) a node removed mid-run: its agents restart on the other worker, the run completes.

The node is crashed the way ``chaos.node_kill_rate`` does it on a real cluster: its raylet and
every process the raylet started die by SIGKILL (``coordinator.chaos.kill_node``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from cluster.connect import connect
from cluster.local import LocalCluster
from coordinator.chaos import ChaosConfig
from coordinator.drill import run_drill
from tests.cluster.conftest import fresh_driver, unauthenticated_local_cluster  # noqa: F401 - fresh_driver is a fixture

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("fresh_driver")]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[LocalCluster]:
    """A head without CPUs (the driver's node, never killed) and two 2-CPU workers."""
    with unauthenticated_local_cluster(num_nodes=3, cpus_per_node=2, head_cpus=0, object_store_memory=80 * MiB) as cluster:
        yield cluster


@pytest.mark.slow
def test_random_agent_kills_across_nodes_never_change_the_outputs(three_nodes, tmp_path):
    """Slow (about 30 s on 2 cores); default-run siblings: a node killed mid-run below, and
    random agent kills on one node (tests/chaos/test_drill.py)."""
    connect(three_nodes.address)
    workers = {n.node_id for n in three_nodes.worker_nodes}
    report = run_drill(ChaosConfig(seed=11, kill_rate=0.2, raise_rate=0.1), tmp_path, run_id="kills", work_s=0.02)
    assert report.passed, report.summary()
    assert report.faults_injected.get("kill", 0) >= 1 and report.dispatches > report.tasks
    assert set(report.nodes_chaos) == workers, "agents spread over both workers"


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
