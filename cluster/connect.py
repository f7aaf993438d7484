"""Connect the driver to a Ray cluster, or start an embedded local one.

``connect()`` is the one place Agent Forge calls ``ray.init``. It resolves where to go in
this order:

1. an explicit ``address`` (``HOST:PORT`` of the head's GCS, ``ray://HOST:10001`` for Ray
   Client, ``"auto"`` for a cluster started on this machine with ``ray start``);
2. the ``RAY_ADDRESS`` environment variable; ``ray job submit`` sets it to the GCS address
   for every job driver, so inside a job the pipeline joins the job's cluster;
3. otherwise a new embedded local Ray with its dashboard bound to 127.0.0.1 (never to all
   interfaces: a Ray dashboard runs arbitrary code for whoever reaches it).

If Ray is already initialised in this process (a Tune trainable, a notebook, a test
fixture), that session is adopted and ``shutdown()`` leaves it alone.

Token authentication (Ray 2.60; src: ray/_private/worker.py ``init`` and
ray/_private/authentication/authentication_token_setup.py):

- ``RAY_AUTH_MODE`` is read from the environment only (``_system_config`` cannot set it).
  ``token``: every Ray RPC and the dashboard need the token, found in ``RAY_AUTH_TOKEN``,
  else the file named by ``RAY_AUTH_TOKEN_PATH`` (unreadable or empty is fatal), else
  ``~/.ray/auth_token``. ``disabled``: no authentication.
- Unset, a *new local* cluster turns token mode on: Ray sets ``RAY_AUTH_MODE=token`` in this
  process's environment and writes ``~/.ray/auth_token`` if it is missing. The embedded
  dashboard then asks for that token (``ray get-auth-token`` prints it). ``shutdown()``
  removes the ``RAY_AUTH_MODE`` that Ray set, so later code sees the environment the user
  had. Set ``RAY_AUTH_MODE=disabled`` to opt out.
- Connecting to an explicit address or ``RAY_ADDRESS`` never switches token mode on; set
  ``RAY_AUTH_MODE=token`` and provide the token to reach a cluster that requires it.
- Ray caches the mode when it is imported; ``connect()`` refreshes that cache first, so an
  environment changed after ``import ray`` is honoured.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from typing import Any

import ray

from coordinator.errors import AgentForgeError

__all__ = ["ClusterError", "ClusterInfo", "connect", "shutdown", "current"]

logger = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
ADDRESS_ENV = "RAY_ADDRESS"
DEFAULT_NAMESPACE = "agentforge"
# A closed port or a dead host must fail in seconds: ray.init itself retries a missing GCS
# for minutes (measured: still waiting after 200 s on Ray 2.60).
PROBE_TIMEOUT_S = 5.0


class ClusterError(AgentForgeError):
    """Reaching, starting or using a Ray cluster failed.

    The message names the address and says how to fix it; ``address`` holds it (``None``
    for the embedded cluster).
    """

    def __init__(self, message: str, address: str | None = None):
        super().__init__(message)
        self.address = address


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """What the driver is connected to.

    ``nodes`` and ``resources`` are a snapshot taken when ``connect()`` first ran.
    ``auth_mode`` is ``"token"`` or ``"disabled"``, as this driver uses it.
    """

    address: str
    dashboard_url: str | None
    namespace: str
    embedded: bool
    nodes: int
    resources: dict[str, float]
    auth_mode: str = "disabled"


@dataclasses.dataclass
class _Session:
    info: ClusterInfo
    owns_ray: bool  # connect() called ray.init, so shutdown() calls ray.shutdown()
    restore_auth_env: bool  # Ray set RAY_AUTH_MODE=token for us; shutdown() unsets it


_lock = threading.Lock()
_session: _Session | None = None


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    runtime_env: dict | None = None,
    log_to_driver: bool = True,
    dashboard_port: int | None = None,
    object_store_memory: int | None = None,
) -> ClusterInfo:
    """Connect to a Ray cluster, or start an embedded one (see the module docstring).

    Idempotent: while connected, later calls return the first call's ``ClusterInfo`` and
    ignore their arguments (a warning names any that differ); call ``shutdown()`` first to
    connect elsewhere.

    Args:
        address: GCS ``HOST:PORT``, ``ray://HOST:PORT``, ``"auto"`` or ``"local"`` (force
            an embedded cluster). ``None``: ``RAY_ADDRESS``, else embedded.
        num_cpus: CPUs of the embedded cluster (default: all); ignored when connecting.
        namespace: Ray namespace for named actors.
        runtime_env: runtime environment for this job's workers.
        log_to_driver: forward worker stdout/stderr to this process.
        dashboard_port: port of the embedded dashboard (default 8265, next free one if taken).
        object_store_memory: bytes of the embedded object store (default: Ray's choice).

    Returns:
        The ``ClusterInfo`` of the connection.

    Raises:
        ClusterError: the address is a dashboard URL, cannot be reached, or ``ray.init``
            failed; the message names the address and the fix.
    """
    global _session
    with _lock:
        if _session is not None:
            if ray.is_initialized():
                _warn_if_different(_session.info, address, namespace)
                return _session.info
            # Someone called ray.shutdown() directly; start over.
            _session = None

        if ray.is_initialized():
            # Adopt a session we did not start (Tune trainable, notebook, test fixture).
            info = _describe(embedded=False, dashboard_url=_current_dashboard_url())
            if info.namespace != namespace:
                logger.warning(
                    "Ray is already initialised in namespace %r, not %r; using it as is.",
                    info.namespace,
                    namespace,
                )
            _session = _Session(info, owns_ray=False, restore_auth_env=False)
            return info

        _refresh_ray_auth_config()
        target, source = _resolve_target(address)
        init_kwargs: dict[str, Any] = dict(
            namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver
        )
        auth_env_before = os.environ.get(AUTH_MODE_ENV)
        if target is None:
            embedded = True
            init_kwargs.update(
                # "local" forces a new cluster: with None, Ray would join whatever cluster
                # /tmp/ray/ray_current_cluster names, e.g. another user's `ray start`.
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                object_store_memory=object_store_memory,
            )
        else:
            embedded = False
            if target != "auto":
                _probe(target, source)
            init_kwargs["address"] = target
        try:
            context = ray.init(**init_kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
            if auth_env_before is None:
                os.environ.pop(AUTH_MODE_ENV, None)  # undo Ray's default switch to token mode
                _refresh_ray_auth_config()
            where = "an embedded local Ray" if embedded else f"Ray at {target} ({source})"
            raise ClusterError(f"could not start or reach {where}: {e}. {_fix(target, source)}", target) from e

        restore = auth_env_before is None and os.environ.get(AUTH_MODE_ENV) is not None
        if embedded and _auth_mode() == "token":
            logger.info(
                "The embedded Ray uses token authentication; `ray get-auth-token` prints the "
                "token the dashboard asks for. Set %s=disabled to opt out.",
                AUTH_MODE_ENV,
            )
        info = _describe(embedded=embedded, dashboard_url=getattr(context, "dashboard_url", None))
        _session = _Session(info, owns_ray=True, restore_auth_env=restore)
        return info


def shutdown() -> None:
    """Undo ``connect()``: disconnect (and stop the embedded cluster) only if it started them.

    A session that ``connect()`` adopted is left running. Safe to call when not connected.
    """
    global _session
    with _lock:
        session, _session = _session, None
        if session is None or not session.owns_ray:
            return
        if ray.is_initialized():
            ray.shutdown()
        if session.restore_auth_env:
            os.environ.pop(AUTH_MODE_ENV, None)
            _refresh_ray_auth_config()


def current() -> ClusterInfo | None:
    """The ``ClusterInfo`` of the live ``connect()`` session, or ``None``."""
    with _lock:
        if _session is not None and ray.is_initialized():
            return _session.info
        return None


def _resolve_target(address: str | None) -> tuple[str | None, str]:
    """Return (address for ray.init or None for embedded, where it came from)."""
    if address is not None:
        target, source = address.strip(), "the address argument"
    elif os.environ.get(ADDRESS_ENV, "").strip():
        target, source = os.environ[ADDRESS_ENV].strip(), f"the {ADDRESS_ENV} environment variable"
    else:
        return None, "default"
    if target == "local":
        return None, source
    if target.startswith(("http://", "https://")):
        raise ClusterError(
            f"{target} (from {source}) is a dashboard / Jobs API URL, not a Ray cluster address. "
            "`agentforge submit --address URL` takes it; to run the pipeline on the cluster "
            "directly use the head's GCS address HOST:6379 (or ray://HOST:10001), "
            f"or unset {ADDRESS_ENV} to start a local Ray.",
            target,
        )
    return target, source


def _split_host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[V6]:PORT`` or ``ray://HOST:PORT``; ValueError when malformed."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _probe(address: str, source: str) -> None:
    """Fail fast with a ClusterError when nothing listens at ``address``."""
    try:
        host, port = _split_host_port(address)
    except ValueError as e:
        raise ClusterError(
            f"invalid Ray address {address!r} (from {source}): {e}. {_fix(address, source)}", address
        ) from e
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise ClusterError(
            f"cannot reach Ray at {address} (from {source}): {e}. {_fix(address, source)}", address
        ) from e


def _fix(address: str | None, source: str) -> str:
    if address is None:
        return (
            "Fix: check the Ray logs under /tmp/ray/session_latest/logs, free memory or ports, "
            "or connect to a running cluster with RAY_ADDRESS=HOST:6379."
        )
    hint = (
        f"Fix: check that the head is up (`ray status --address {address}`) and that the port is "
        "open from this machine; if the cluster uses token authentication, set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (print it on the head with `ray get-auth-token`)."
    )
    if ADDRESS_ENV in source:
        hint += f" Or unset {ADDRESS_ENV} to start a local Ray."
    return hint


def _auth_mode() -> str:
    return "token" if os.environ.get(AUTH_MODE_ENV, "").strip().lower() == "token" else "disabled"


def _refresh_ray_auth_config() -> None:
    """Make Ray re-read RAY_AUTH_MODE and the token from the current environment.

    Ray caches both in C++ at import (RayConfig, AuthenticationTokenLoader); Ray itself
    refreshes them this way when it switches token mode on (authentication_token_setup.py).
    Only called while no driver is connected.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _current_dashboard_url() -> str | None:
    try:
        return ray._private.worker.get_dashboard_url()
    except (AttributeError, RuntimeError):
        # Ray Client sessions have no local node object to ask.
        return None


def _describe(*, embedded: bool, dashboard_url: str | None) -> ClusterInfo:
    runtime = ray.get_runtime_context()
    try:
        address = runtime.gcs_address
    except (AttributeError, RuntimeError):
        address = os.environ.get(ADDRESS_ENV, "")
    if dashboard_url and "://" not in dashboard_url:
        dashboard_url = f"http://{dashboard_url}"
    alive = [node for node in ray.nodes() if node.get("Alive")]
    return ClusterInfo(
        address=address,
        dashboard_url=dashboard_url or None,
        namespace=runtime.namespace,
        embedded=embedded,
        nodes=len(alive),
        resources={k: float(v) for k, v in ray.cluster_resources().items()},
        auth_mode=_auth_mode(),
    )


def _warn_if_different(info: ClusterInfo, address: str | None, namespace: str) -> None:
    if address not in (None, info.address) or namespace != info.namespace:
        logger.warning(
            "connect() is already connected to %s (namespace %r); ignoring address=%r, "
            "namespace=%r. Call cluster.shutdown() first to connect elsewhere.",
            info.address,
            info.namespace,
            address,
            namespace,
        )
