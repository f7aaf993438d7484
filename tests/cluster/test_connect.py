"""cluster.connect on real Ray: the embedded cluster, token auth either way, and bad addresses."""

from __future__ import annotations

import os
import socket
import time

import pytest
import ray
import requests

from cluster.connect import ClusterError, ClusterInfo, connect, current, shutdown
from coordinator.errors import AgentForgeError
from tests.cluster.conftest import free_port

pytestmark = pytest.mark.usefixtures("fresh_driver")

MiB = 1024 * 1024


@ray.remote(num_cpus=1)
def _square(x: int) -> int:
    return x * x


def _assert_loopback_only(dashboard_url: str) -> None:
    """The dashboard answers on 127.0.0.1 and not on the machine's own address."""
    port = int(dashboard_url.rsplit(":", 1)[1])
    node_ip = ray.util.get_node_ip_address()
    if node_ip.startswith("127."):
        return  # this machine has no other address to try
    with pytest.raises(OSError):
        socket.create_connection((node_ip, port), timeout=2).close()


def test_embedded_default_turns_token_auth_on_and_shutdown_undoes_it(auth_env):
    """RAY_AUTH_MODE unset: Ray 2.60 makes the new local cluster use a token (~/.ray/auth_token)."""
    info = connect(num_cpus=1, dashboard_port=free_port(), object_store_memory=80 * MiB)

    assert isinstance(info, ClusterInfo)
    assert info.embedded is True
    assert info.namespace == "agentforge"
    assert info.nodes == 1
    assert info.resources["CPU"] == 1.0
    assert info.dashboard_url is not None and info.dashboard_url.startswith("http://127.0.0.1:")
    assert info.auth_mode == "token"
    token = (auth_env / ".ray" / "auth_token").read_text().strip()
    assert token, "Ray should have written a token into the (temporary) HOME"
    assert os.environ["RAY_AUTH_MODE"] == "token"

    # The dashboard enforces the token, and sits on loopback only.
    mode = requests.get(f"{info.dashboard_url}/api/authentication_mode", timeout=10).json()
    assert mode == {"authentication_mode": "token"}
    assert requests.get(f"{info.dashboard_url}/api/jobs/", timeout=10).status_code == 401
    authorized = requests.get(
        f"{info.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert authorized.status_code == 200
    _assert_loopback_only(info.dashboard_url)

    # Idempotent, and usable.
    assert connect() is info
    assert current() is info
    assert ray.get_runtime_context().namespace == "agentforge"
    assert ray.get([_square.remote(i) for i in range(4)]) == [0, 1, 4, 9]

    shutdown()
    assert not ray.is_initialized()
    assert current() is None
    assert "RAY_AUTH_MODE" not in os.environ, "shutdown() must undo the mode Ray set for us"
    shutdown()  # a second call is a no-op


@pytest.mark.slow
def test_embedded_with_auth_disabled(auth_env, monkeypatch):
    """Slow (about 11 s: an embedded Ray of its own); default-run sibling:
    test_embedded_default_turns_token_auth_on_and_shutdown_undoes_it."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    info = connect(num_cpus=1, namespace="af-test", dashboard_port=free_port(), object_store_memory=80 * MiB)

    assert info.embedded and info.auth_mode == "disabled" and info.namespace == "af-test"
    assert not (auth_env / ".ray" / "auth_token").exists()
    assert requests.get(f"{info.dashboard_url}/api/jobs/", timeout=10).status_code == 200
    assert ray.get(_square.remote(7)) == 49

    shutdown()
    assert not ray.is_initialized()
    assert os.environ["RAY_AUTH_MODE"] == "disabled", "a mode the user set stays set"


def test_unreachable_address_fails_fast_with_the_fix(auth_env):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ClusterError) as caught:
        connect(address)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert address in message and "ray status" in message
    assert caught.value.address == address
    assert isinstance(caught.value, AgentForgeError)
    assert not ray.is_initialized()


def test_ray_address_env_is_used_and_named(auth_env, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ClusterError, match="RAY_ADDRESS") as caught:
        connect()
    assert address in str(caught.value)
    assert "unset RAY_ADDRESS" in str(caught.value)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://127.0.0.1:8265", "dashboard"),
        ("not-an-address", "HOST:PORT"),
    ],
)
def test_malformed_addresses_are_explained(auth_env, address, expected):
    with pytest.raises(ClusterError, match=expected):
        connect(address)
    assert not ray.is_initialized()
