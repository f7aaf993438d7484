"""Submit Agent Forge runs to a Ray cluster as Ray Jobs (``agentforge submit``).

A thin layer over ``ray.job_submission.JobSubmissionClient`` that adds what a command line
needs: the project folder uploaded as the job's ``working_dir`` (without run folders, W&B
logs, ``.git`` and caches), logs streamed while the job runs, the job's end mapped to an
exit code (0 iff SUCCEEDED), and errors that name the address and the fix.

The working dir is unpacked on the cluster but not pip-installed, so the job runs
``python -m coordinator.cli ARGS`` rather than the ``agentforge`` console script. Ray
``cd``s the job driver into the unpacked folder and puts it first on ``PYTHONPATH``
(src: ray/_private/runtime_env/working_dir.py ``WorkingDirPlugin.modify_context``), so the
project's packages import from there on the head and on every worker.

Token authentication (Ray 2.60; src: ray/dashboard/modules/dashboard_sdk.py,
ray/_private/authentication/http_token_authentication.py): Ray's client adds
``Authorization: Bearer TOKEN`` only when this process's ``RAY_AUTH_MODE`` is ``token``.
Here the token is sent whenever the cluster asks for one, found in this order: the
``token`` argument, ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token`` (the last three are Ray's own order). Whether the cluster asks is read
from its public ``/api/authentication_mode`` endpoint; a cluster without authentication is
never sent the token. ``RAY_AUTH_MODE=disabled`` here stops the token files from being
read; an explicit ``token`` is still used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import requests
from ray.exceptions import AuthenticationError, RayError
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.connect import ClusterError

__all__ = [
    "DEFAULT_EXCLUDES",
    "JobOutcome",
    "agentforge_entrypoint",
    "submit",
    "submit_entrypoint",
    "follow_job",
    "resolve_address",
    "resolve_token",
    "add_submit_arguments",
    "run_submit",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_DASHBOARD_ADDRESS = "http://127.0.0.1:8265"
# gitwildmatch patterns, relative to the working dir (Ray also honours .gitignore there).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "runs/",
    "wandb/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".hypothesis/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".venv/",
    "*.egg-info/",
    "build/",
    "dist/",
)
# Connect within 5 s, answer within 30 s: a firewalled host otherwise hangs for minutes.
_PROBE_TIMEOUT_S = (5.0, 30.0)
_TOKEN_FIX = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token "
    "(print it on the head with `ray get-auth-token`), or pass --token"
)
# JobSubmissionClient always lets these override its address argument
# (src: ray/dashboard/utils.py get_address_for_submission_client).
_ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_env_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """Where a submitted job stands.

    ``status`` is a Ray ``JobStatus`` value (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED).
    ``exit_code`` is 0 iff SUCCEEDED, the driver's exit code (or 1) otherwise, and ``None``
    while the job has not finished (``follow=False``). ``message`` is Ray's status message.
    """

    job_id: str
    status: str
    exit_code: int | None
    message: str = ""
    address: str = ""


def agentforge_entrypoint(args: Sequence[str]) -> str:
    """The shell command that runs ``agentforge ARGS`` from an unpacked working dir."""
    return shlex.join(["python", "-m", "coordinator.cli", *args])


def submit(
    entrypoint_args: Sequence[str],
    *,
    address: str | None = None,
    working_dir: str | os.PathLike | None = ".",
    runtime_env: dict | None = None,
    submission_id: str | None = None,
    follow: bool = True,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    stream: TextIO | None = None,
) -> JobOutcome:
    """Submit ``agentforge ENTRYPOINT_ARGS`` (e.g. ``["run", "configs/small.yaml"]``) as a Ray Job.

    Args:
        entrypoint_args: arguments of the ``agentforge`` command.
        address: the dashboard / Jobs API URL (``http://HEAD:8265``); ``None``:
            ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else http://127.0.0.1:8265.
        working_dir: folder uploaded and used as the job's cwd (the project root); ``None``
            uploads nothing (an image that already holds the project).
        runtime_env: more runtime_env fields (``env_vars``, ``pip``, ...); its
            ``excludes`` are added to ``excludes``.
        submission_id: the job id to use (default: Ray makes one).
        follow: stream logs and wait for the end; ``False`` returns after submission.
        excludes: gitwildmatch patterns left out of the upload.
        token: the cluster's auth token (default: looked up, see the module docstring).
        headers: extra HTTP headers (e.g. for a proxy).
        metadata: job metadata shown in the dashboard.
        stream: where logs go (default ``sys.stdout``).

    Returns:
        The job's ``JobOutcome``.

    Raises:
        ClusterError: the cluster cannot be reached, refuses the token, or rejects the job.
    """
    return submit_entrypoint(
        agentforge_entrypoint(entrypoint_args),
        address=address,
        working_dir=working_dir,
        runtime_env=runtime_env,
        submission_id=submission_id,
        follow=follow,
        excludes=excludes,
        token=token,
        headers=headers,
        metadata=metadata,
        stream=stream,
    )


def submit_entrypoint(
    entrypoint: str,
    *,
    address: str | None = None,
    working_dir: str | os.PathLike | None = ".",
    runtime_env: dict | None = None,
    submission_id: str | None = None,
    follow: bool = True,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    stream: TextIO | None = None,
) -> JobOutcome:
    """Submit any shell command as a Ray Job; ``submit`` with the entrypoint spelled out.

    Args, Returns and Raises: as ``submit``, with ``entrypoint`` the shell command.
    """
    url = resolve_address(address)
    env = dict(runtime_env or {})
    if working_dir is not None:
        folder = Path(working_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ClusterError(f"working_dir {folder} is not a folder; pass the project root", url)
        env["working_dir"] = str(folder)
        env["excludes"] = [*excludes, *env.get("excludes", [])]
    client = _client(url, token=token, headers=headers)
    with _translate_errors(url):
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=env,
            submission_id=submission_id,
            metadata=metadata,
        )
    logger.info("submitted job %s to %s: %s", job_id, url, entrypoint)
    if not follow:
        with _translate_errors(url):
            status = client.get_job_status(job_id)
        return JobOutcome(job_id, str(status.value), None, "", url)
    return _follow(client, url, job_id, stream or sys.stdout)


def follow_job(
    job_id: str,
    *,
    address: str | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    stream: TextIO | None = None,
    logs: bool = True,
) -> JobOutcome:
    """Wait for a submitted job to finish, streaming its logs from the start.

    Args:
        job_id: the submission id ``submit`` returned.
        address, token, headers: as for ``submit``.
        stream: where logs go (default ``sys.stdout``).
        logs: ``False`` waits without printing logs.

    Returns:
        The job's final ``JobOutcome``.

    Raises:
        ClusterError: the cluster cannot be reached or does not know the job.
    """
    url = resolve_address(address)
    client = _client(url, token=token, headers=headers)
    return _follow(client, url, job_id, (stream or sys.stdout) if logs else None)


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else local.

    A bare ``HOST:PORT`` is taken as ``http://HOST:PORT`` (the dashboard port, 8265 by
    default, not the GCS port).

    Raises:
        ClusterError: the address is a Ray Client (``ray://``) address.
    """
    for candidate in (address, *(os.environ.get(name) for name in _ADDRESS_ENVS)):
        if candidate and candidate.strip() and candidate.strip() != "auto":
            url = candidate.strip().rstrip("/")
            break
    else:
        url = DEFAULT_DASHBOARD_ADDRESS
    if url.startswith("ray://"):
        raise ClusterError(
            f"{url} is a Ray Client address; jobs go to the dashboard URL, e.g. "
            "http://HEAD:8265 (`kubectl port-forward svc/HEAD-svc 8265` or `ray dashboard "
            "cluster.yaml` forwards it to http://127.0.0.1:8265)",
            url,
        )
    return url if "://" in url else f"http://{url}"


def resolve_token(token: str | None = None) -> tuple[str | None, str]:
    """Find the auth token: ``token``, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Returns:
        ``(token or None, where it came from)``; the files are not read when
        ``RAY_AUTH_MODE=disabled``.

    Raises:
        ClusterError: RAY_AUTH_TOKEN_PATH names a missing, unreadable or empty file (Ray
            treats that as fatal too).
    """
    if token and token.strip():
        return token.strip(), "the token argument"
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled here, so no token file was read"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        try:
            value = Path(token_path).expanduser().read_text().strip()
        except OSError as e:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={token_path} cannot be read: {e}") from e
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={token_path} is empty; {_TOKEN_FIX}")
        return value, f"RAY_AUTH_TOKEN_PATH={token_path}"
    default = Path.home() / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None, "nowhere (no --token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    return (value or None), str(default)


def _server_auth_mode(url: str, headers: dict[str, str]) -> str | None:
    """Ask the dashboard whether it needs a token: "token", "disabled", or None (Ray < 2.52).

    Also the reachability check, with timeouts: Ray's client has none.
    """
    try:
        response = requests.get(f"{url}/api/authentication_mode", headers=headers, timeout=_PROBE_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {url}: {_network_reason(e)}. {_connection_fix(url)}", url
        ) from e
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return str(body.get("authentication_mode")) if isinstance(body, dict) else None


def _client(url: str, *, token: str | None, headers: dict[str, str] | None) -> JobSubmissionClient:
    """A JobSubmissionClient for ``url`` with the Authorization header the cluster needs."""
    all_headers = dict(headers or {})
    mode = _server_auth_mode(url, all_headers)
    if not any(key.lower() == "authorization" for key in all_headers):
        if mode != "disabled":
            found, source = resolve_token(token)
            if found:
                all_headers["Authorization"] = f"Bearer {found}"
            elif mode == "token":
                raise ClusterError(
                    f"the Ray cluster at {url} requires token authentication and no token was "
                    f"found ({source}). Fix: {_TOKEN_FIX}.",
                    url,
                )
    with _translate_errors(url), _env_lock, _without_address_env():
        return JobSubmissionClient(url, headers=all_headers)


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client is built.

    ``url`` already took them into account; left set, they would silently replace an
    explicit address (inside a job, RAY_ADDRESS is the GCS address, not a URL).
    """
    saved = {name: os.environ.pop(name) for name in _ADDRESS_ENVS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _translate_errors(url: str) -> Iterator[None]:
    """Turn Ray's and requests' errors into ClusterError naming ``url`` and the fix."""
    try:
        yield
    except AuthenticationError as e:
        raise ClusterError(
            f"authentication with the Ray cluster at {url} failed: {_first_line(e)}. Fix: {_TOKEN_FIX}.", url
        ) from e
    except (ConnectionError, requests.exceptions.RequestException) as e:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {url}: {_network_reason(e)}. {_connection_fix(url)}", url
        ) from e
    except RayError as e:
        # e.g. RuntimeEnvSetupError while packaging or uploading working_dir.
        raise ClusterError(f"the Ray cluster at {url} could not take the job: {_first_line(e)}", url) from e
    except RuntimeError as e:
        # JobSubmissionClient raises RuntimeError for HTTP errors (duplicate submission id,
        # unknown job, version mismatch).
        raise ClusterError(f"the Ray Jobs API at {url} refused the request: {_first_line(e)}", url) from e


def _network_reason(error: BaseException) -> str:
    """The useful end of requests' nested connection messages."""
    text = str(error)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _connection_fix(url: str) -> str:
    return (
        f"Fix: check that the head is up and its dashboard listens on {url} (`ray start --head "
        "--dashboard-host=0.0.0.0`, or forward the port: `ray dashboard cluster.yaml`, "
        "`kubectl port-forward svc/HEAD-svc 8265:8265`)."
    )


def _follow(client: JobSubmissionClient, url: str, job_id: str, stream: TextIO | None) -> JobOutcome:
    written = 0
    try:
        if stream is not None:
            written = _tail_logs(client, job_id, stream)
        with _translate_errors(url):
            while True:
                status = client.get_job_status(job_id)
                if stream is not None:
                    # Whatever the websocket tail missed (it closed early or was not used).
                    text = client.get_job_logs(job_id)
                    if len(text) > written:
                        stream.write(text[written:])
                        stream.flush()
                        written = len(text)
                if status.is_terminal():
                    break
                time.sleep(1.0)
            info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(
            f"\nStopped following; job {job_id} keeps running. Stop it with "
            f"`ray job stop {job_id} --address {url}`.",
            file=sys.stderr,
        )
        raise
    return JobOutcome(job_id, str(info.status.value), _exit_code(info), info.message or "", url)


def _tail_logs(client: JobSubmissionClient, job_id: str, stream: TextIO) -> int:
    """Stream logs over Ray's websocket until the job ends; return the characters written."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return 0  # inside an event loop (notebook): the caller polls instead
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, aiohttp.ClientError) as e:
        # The websocket closed abnormally (head restarted, proxy timeout); polling takes over.
        logger.info("log stream of job %s ended early (%s); polling instead", job_id, e)
    return written


def _exit_code(info: Any) -> int:
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = info.driver_exit_code
    if isinstance(code, int) and code > 0:
        return code
    if isinstance(code, int) and code < 0:
        return 128 - code  # killed by signal -code, as a shell reports it
    return 1


def add_submit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``agentforge submit`` options to ``parser`` (for the CLI's subcommand)."""
    parser.add_argument(
        "--address",
        default=None,
        help="Jobs API URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
        "http://127.0.0.1:8265)",
    )
    parser.add_argument("--working-dir", default=".", help="project folder to upload (default: .)")
    parser.add_argument("--no-upload", action="store_true", help="upload nothing; the image holds the project")
    parser.add_argument("--token", default=None, help="the cluster's auth token; prefer RAY_AUTH_TOKEN, which stays out of shell history")
    parser.add_argument("--submission-id", default=None, help="job id to use")
    parser.add_argument("--exclude", action="append", default=[], help="more gitwildmatch patterns not to upload")
    parser.add_argument("--runtime-env-json", default=None, help="more runtime_env fields as JSON")
    parser.add_argument("--no-wait", action="store_true", help="return after submission with the job id")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON on the last line")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="agentforge arguments, after --")
    return parser


def run_submit(options: argparse.Namespace) -> int:
    """Run ``agentforge submit`` from parsed options; return the process exit code."""
    args = list(options.args)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(
            "agentforge submit: give the agentforge arguments after --, e.g. -- run configs/small.yaml",
            file=sys.stderr,
        )
        return 2
    try:
        runtime_env = json.loads(options.runtime_env_json) if options.runtime_env_json else None
        outcome = submit(
            args,
            address=options.address,
            working_dir=None if options.no_upload else options.working_dir,
            runtime_env=runtime_env,
            submission_id=options.submission_id,
            follow=not options.no_wait,
            excludes=[*DEFAULT_EXCLUDES, *options.exclude],
            token=options.token,
        )
    except json.JSONDecodeError as e:
        print(f"agentforge submit: --runtime-env-json is not JSON: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"agentforge submit: {e}", file=sys.stderr)
        return 1
    if options.no_wait:
        print(f"submitted job {outcome.job_id} ({outcome.status}); follow it with "
              f"`ray job logs --follow {outcome.job_id} --address {outcome.address}`")
    elif outcome.exit_code:
        reason = outcome.message.strip().splitlines()[0] if outcome.message.strip() else "no message"
        print(f"agentforge submit: job {outcome.job_id} ended {outcome.status}: {reason}", file=sys.stderr)
    if options.json:
        print(json.dumps(dataclasses.asdict(outcome)))
    return outcome.exit_code or 0


def main(argv: Sequence[str] | None = None) -> int:
    """``agentforge submit`` as a function: ``main(["--address", URL, "--", "run", ...])``.

    Returns:
        The exit code: the job's (0 iff SUCCEEDED), 0 after ``--no-wait``, 1 when the
        cluster cannot be used, 2 for bad usage.
    """
    parser = add_submit_arguments(
        argparse.ArgumentParser(prog="agentforge submit", description="Submit an agentforge run as a Ray Job.")
    )
    return run_submit(parser.parse_args(argv))
