"""A multi-node Ray cluster on one machine, for tests and for trying out scaling.

``LocalCluster`` wraps ``ray.cluster_utils.Cluster`` (a Ray @DeveloperAPI): every "node" is
its own raylet, object store and dashboard agent on this machine, so a test can pin work to
a node, kill that node, and watch the rest of the cluster carry on. All nodes share the
local disk, so a run folder is reachable from every node, as DESIGN.md requires.

Defaults suit a 2-core CI box: the head has no CPUs (the driver attaches there and work
goes to the workers), each node gets a small object store, and the GCS declares a killed
node dead in about two seconds instead of Ray's default of about fifteen.

Known side effects of ``cluster_utils.Cluster`` (Ray 2.60, ray/cluster_utils.py): adding
the head writes /tmp/ray/ray_current_cluster (so ``ray.init("auto")`` elsewhere on the
machine finds this cluster) and ``shutdown()`` deletes that file. Nodes inherit this
process's environment, including ``RAY_AUTH_MODE``; with ``token`` a token must be
available (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``), ``cluster_utils`` does not make one.

Example::

    with LocalCluster(num_nodes=3) as lc:
        info = cluster.connect(lc.address)
        ...
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.cluster_utils import Cluster

from cluster.connect import current
from cluster.connect import shutdown as disconnect

__all__ = ["LocalCluster", "FAST_NODE_DEATH_CONFIG"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024

# GCS health checks of raylets (ray_config_def.h names). A killed raylet refuses the
# connection, so death is declared after threshold x period = 2 s. The timeout stays
# generous because a loaded 2-core box can be slow to answer a live node's check.
FAST_NODE_DEATH_CONFIG: dict[str, Any] = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 4,
}


class LocalCluster:
    """A head plus worker nodes on this machine (see the module docstring).

    Args:
        num_nodes: nodes in all, head included (>= 1); ``num_nodes=3`` is a head and two
            workers.
        cpus_per_node: CPUs each worker node declares.
        head_cpus: CPUs the head declares; 0 keeps tasks off the node the driver uses.
        object_store_memory: bytes of each node's object store.
        system_config: Ray ``_system_config`` for the head, merged over
            ``FAST_NODE_DEATH_CONFIG``.
        include_dashboard: start the dashboard on the head (127.0.0.1, a free port from
            8265 up); off by default because it costs memory and seconds.
        worker_resources: custom resources every worker node declares.

    Raises:
        ValueError: ``num_nodes`` < 1.
        TimeoutError: a node did not register with the GCS in time.
    """

    def __init__(
        self,
        num_nodes: int = 3,
        cpus_per_node: float = 1,
        *,
        head_cpus: float = 0,
        object_store_memory: int = 100 * MiB,
        system_config: dict[str, Any] | None = None,
        include_dashboard: bool = False,
        worker_resources: dict[str, float] | None = None,
    ):
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1 (the head counts), got {num_nodes}")
        self.cpus_per_node = cpus_per_node
        self.object_store_memory = object_store_memory
        self.worker_resources = dict(worker_resources or {})
        self._order: dict[str, int] = {}  # node id -> position, so worker_nodes is stable
        head_args: dict[str, Any] = {
            "num_cpus": head_cpus,
            "object_store_memory": object_store_memory,
            "include_dashboard": include_dashboard,
            "_system_config": {**FAST_NODE_DEATH_CONFIG, **(system_config or {})},
        }
        if include_dashboard:
            head_args["dashboard_host"] = "127.0.0.1"
        self._cluster = Cluster(initialize_head=True, head_node_args=head_args)
        try:
            for _ in range(num_nodes - 1):
                self.add_node(wait=False)
            self._cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        """GCS address of the head (``HOST:PORT``), for ``connect()`` or ``ray.init``."""
        return self._cluster.address

    @property
    def head_node(self) -> "ray._private.node.Node":
        """The head node (the driver attaches to it)."""
        return self._cluster.head_node

    @property
    def worker_nodes(self) -> list["ray._private.node.Node"]:
        """Live worker nodes in the order they were added; ``.node_id`` is Ray's hex id."""
        return sorted(self._cluster.worker_nodes, key=lambda node: self._order[node.node_id])

    @property
    def dashboard_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` when the dashboard was started, else ``None``."""
        url = self._cluster.webui_url
        return f"http://{url}" if url else None

    def add_node(
        self, *, num_cpus: float | None = None, wait: bool = True, **node_args: Any
    ) -> "ray._private.node.Node":
        """Start one more worker node.

        Args:
            num_cpus: CPUs it declares (default ``cpus_per_node``).
            wait: block until the GCS lists it.
            **node_args: other ``cluster_utils.Cluster.add_node`` arguments
                (``resources``, ``num_gpus``, ``labels``, ...).

        Returns:
            The new node.
        """
        node_args.setdefault("object_store_memory", self.object_store_memory)
        if self.worker_resources and "resources" not in node_args:
            node_args["resources"] = dict(self.worker_resources)
        node = self._cluster.add_node(
            wait=wait,
            num_cpus=self.cpus_per_node if num_cpus is None else num_cpus,
            **node_args,
        )
        self._order[node.node_id] = len(self._order)
        return node

    def remove_node(self, node: "ray._private.node.Node", graceful: bool = False, *, wait: bool = True) -> None:
        """Kill every process of ``node``; ``graceful=False`` simulates a crash.

        Args:
            node: a node of this cluster (usually from ``worker_nodes``).
            graceful: let its processes exit cleanly (SIGTERM first).
            wait: block until the GCS has marked it dead.

        Raises:
            ValueError: ``node`` is the node this process's driver is attached to (Ray would
                shut the driver down); remove another node.
            TimeoutError: the GCS did not mark it dead in time.
        """
        if ray.is_initialized():
            driver_node = ray._private.worker.global_worker.node
            if driver_node is not None and driver_node.raylet_socket_name == node.raylet_socket_name:
                raise ValueError(
                    f"node {node.node_id} hosts this process's Ray driver; removing it would "
                    "break the driver. Remove a worker node instead."
                )
        self._cluster.remove_node(node, allow_graceful=graceful)
        if wait:
            self._cluster.wait_for_nodes()

    def wait_for_nodes(self, timeout: float = 30) -> None:
        """Block until the GCS lists exactly the nodes added and not removed.

        Raises:
            TimeoutError: not within ``timeout`` seconds (e.g. a node died on its own).
        """
        self._cluster.wait_for_nodes(timeout=timeout)

    def shutdown(self) -> None:
        """Disconnect a driver attached to this cluster, then stop every node. Idempotent."""
        cluster = getattr(self, "_cluster", None)
        if cluster is None:
            return
        if ray.is_initialized() and cluster.address is not None:
            try:
                attached = ray.get_runtime_context().gcs_address == cluster.address
            except (AttributeError, RuntimeError):
                attached = False
            if attached:
                # Through connect.shutdown() first, so its session state resets too.
                if current() is not None:
                    disconnect()
                if ray.is_initialized():
                    ray.shutdown()
        cluster.shutdown()
        self._cluster = None

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
