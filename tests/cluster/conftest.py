"""Fixtures for the cluster/ tests: real Ray processes, isolated from the rest of the machine.

Every fixture keeps Ray's auth state explicit (RAY_AUTH_MODE set, HOME pointed at a temp
folder so ~/.ray/auth_token is never the user's), and stops only the processes it started:
other tests may run Ray on this machine at the same time, so no `ray stop`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray  # noqa: F401  (also puts Ray's vendored psutil on sys.path)
import psutil  # noqa: E402
import requests

from cluster.local import LocalCluster

REPO_ROOT = Path(__file__).resolve().parents[2]
_AUTH_ENVS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refresh_ray_auth() -> None:
    """Make this process's Ray re-read RAY_AUTH_MODE and the token (they are cached in C++).

    Skipped while a driver is connected: its gRPC threads read that state.
    """
    if ray.is_initialized():
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def unauthenticated_local_cluster(**kwargs) -> Iterator[LocalCluster]:
    """A ``cluster.LocalCluster(**kwargs)`` with token auth off and no RAY_ADDRESS: its nodes
    inherit this process's environment, so it is set for them (see ``auth_env``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        refresh_ray_auth()
        with LocalCluster(**kwargs) as cluster:
            yield cluster
    refresh_ray_auth()


@pytest.fixture
def auth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A clean auth environment: no Ray address or token variables, HOME in a temp folder.

    Returns the temp HOME. Ray's cached auth state is refreshed before and after the test.
    """
    for name in _AUTH_ENVS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    refresh_ray_auth()
    yield home
    monkeypatch.undo()
    refresh_ray_auth()


@pytest.fixture
def fresh_driver() -> Iterator[None]:
    """The test starts without a Ray driver in this process and ends without one."""
    from cluster.connect import current, shutdown

    if ray.is_initialized() and current() is None:
        pytest.skip("another test left Ray initialised in this process; cluster tests need a fresh driver")
    yield
    shutdown()
    if ray.is_initialized():
        ray.shutdown()


@dataclass
class TokenHead:
    """A `ray start --head --block` process with token authentication."""

    dashboard_url: str
    gcs_address: str
    token: str
    token_path: Path
    env: dict[str, str]


def _generate_token(home: Path) -> str:
    """Make a token the way users do: `ray get-auth-token --generate`, into HOME/.ray."""
    env = {**os.environ, "HOME": str(home)}
    for name in _AUTH_ENVS:
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    token = result.stdout.strip()
    assert token and (home / ".ray" / "auth_token").read_text().strip() == token
    return token


def _stop_tree(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop `ray start --block` (SIGTERM makes it kill its node) and any process it left."""
    try:
        tree = [process, *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    pids = [p.pid for p in tree[1:]]
    survivors = []
    for pid in pids:
        try:
            survivors.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for proc in survivors:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(survivors, timeout=10)


@pytest.fixture(scope="module")
def token_head() -> Iterator[TokenHead]:
    """A one-CPU head with RAY_AUTH_MODE=token, unique ports and its own temp dir."""
    base = Path(tempfile.mkdtemp(prefix="afray", dir="/tmp"))  # short: Unix socket paths are capped
    home = base / "home"
    home.mkdir()
    token = _generate_token(home)
    token_path = home / ".ray" / "auth_token"
    port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    log = open(base / "ray-start.log", "w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=1",
            "--object-store-memory=104857600",
            f"--temp-dir={base / 'ray'}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_jobs_api(url, token, process, base / "ray-start.log")
        yield TokenHead(url, f"127.0.0.1:{port}", token, token_path, env)
    finally:
        _stop_tree(process)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_jobs_api(url: str, token: str, process: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    """Block until the head's Jobs API answers an authenticated request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            response = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if response.status_code == 200:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Jobs API at {url} did not come up in {timeout} s:\n{log_path.read_text()[-4000:]}")
