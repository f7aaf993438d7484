"""cluster.LocalCluster: three real Ray nodes on this machine, pinning work, losing a node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.connect import connect, current, shutdown
from cluster.local import LocalCluster
from tests.cluster.conftest import unauthenticated_local_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("fresh_driver")]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """A head (0 CPUs) and two 1-CPU workers, token auth off, shared by this module."""
    with unauthenticated_local_cluster(num_nodes=3, cpus_per_node=1, head_cpus=0, object_store_memory=100 * MiB) as cluster:
        yield cluster


@ray.remote(num_cpus=1)
def _node_of_this_task() -> str:
    return ray.get_runtime_context().get_node_id()


def _pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def test_connect_by_address(local_cluster):
    info = connect(local_cluster.address, namespace="af-local")
    assert info.embedded is False
    assert info.nodes == 3
    assert info.resources["CPU"] == 2.0  # the head declares none
    assert info.auth_mode == "disabled"
    assert info.namespace == "af-local"
    assert len(local_cluster.worker_nodes) == 2

    shutdown()
    assert not ray.is_initialized()
    local_cluster.wait_for_nodes(timeout=10)  # disconnecting left the cluster running


def test_adopts_a_driver_it_did_not_start(local_cluster):
    ray.init(address=local_cluster.address, namespace="someone-else")
    info = connect()
    assert info.embedded is False and info.namespace == "someone-else" and info.nodes == 3
    shutdown()
    assert ray.is_initialized(), "shutdown() must leave a session it did not start"


def test_pinned_task_runs_on_its_worker_and_the_cluster_survives_a_node_crash(local_cluster):
    connect(local_cluster.address)
    first, second = local_cluster.worker_nodes

    for worker in (first, second):
        ran_on = ray.get(_node_of_this_task.options(scheduling_strategy=_pinned(worker.node_id)).remote())
        assert ran_on == worker.node_id

    with pytest.raises(ValueError, match="driver"):
        local_cluster.remove_node(local_cluster.head_node)  # the driver lives there

    local_cluster.remove_node(first, graceful=False)  # a crash: SIGKILL, no drain
    assert local_cluster.worker_nodes == [second]
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert first.node_id not in alive and second.node_id in alive

    # Unpinned work goes on, on the surviving worker.
    assert set(ray.get([_node_of_this_task.remote() for _ in range(4)])) == {second.node_id}
    # Work pinned hard to the dead node is refused, not left pending forever.
    with pytest.raises(ray.exceptions.TaskUnschedulableError):
        ray.get(_node_of_this_task.options(scheduling_strategy=_pinned(first.node_id)).remote(), timeout=60)

    # Scaling back out: a new node takes work at once.
    replacement = local_cluster.add_node()
    ran_on = ray.get(_node_of_this_task.options(scheduling_strategy=_pinned(replacement.node_id)).remote())
    assert ran_on == replacement.node_id
    assert sum(node["Alive"] for node in ray.nodes()) == 3
    assert current() is not None
