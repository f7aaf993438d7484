"""cluster.jobs against a real `ray start --head` with token authentication.

The head runs in its own session with its own ports and temp dir (conftest.token_head);
the client side of each test gets a clean auth environment (conftest.auth_env), so which
token is sent is always the test's choice.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import time
from pathlib import Path

import pytest
import ray

from cluster import jobs
from cluster.connect import ClusterError
from tests.cluster.conftest import REPO_ROOT, free_port


HELLO = """\
import ray

ray.init()  # RAY_ADDRESS, set by the job supervisor


@ray.remote
def add(a, b):
    return a + b


print("HELLO-FROM-JOB", ray.get(add.remote(40, 2)), flush=True)
"""


@pytest.fixture
def script_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "hello.py").write_text(HELLO)
    (folder / "runs").mkdir()  # must not be uploaded
    (folder / "runs" / "big.bin").write_bytes(b"x" * 1024)
    return folder


@pytest.mark.cluster
@pytest.mark.slow  # about 15 s; default-run sibling: test_agentforge_cli_runs_as_a_job (below)
def test_script_job_succeeds_and_streams_its_logs(token_head, auth_env, script_dir):
    logs = io.StringIO()
    outcome = jobs.submit_entrypoint(
        "python hello.py && test ! -e runs",
        address=token_head.dashboard_url,
        working_dir=script_dir,
        token=token_head.token,
        stream=logs,
    )
    assert outcome.status == "SUCCEEDED"
    assert outcome.exit_code == 0
    assert outcome.job_id.startswith("raysubmit_")
    assert logs.getvalue().count("HELLO-FROM-JOB 42") == 1, logs.getvalue()


@pytest.mark.cluster
@pytest.mark.slow
def test_failing_job_no_wait_then_follow(token_head, auth_env, script_dir):
    """Slow (about 11 s); default-run sibling: test_command_line_no_wait_json (no-wait submission)
    and test_agentforge_cli_runs_as_a_job (following a job to its end)."""
    outcome = jobs.submit_entrypoint(
        "python -c 'import sys; print(\"boom\", flush=True); sys.exit(3)'",
        address=token_head.dashboard_url,
        working_dir=script_dir,
        token=token_head.token,
        follow=False,
    )
    assert outcome.exit_code is None
    assert outcome.status in {"PENDING", "RUNNING", "FAILED"}

    logs = io.StringIO()
    final = jobs.follow_job(outcome.job_id, address=token_head.dashboard_url, token=token_head.token, stream=logs)
    assert final.status == "FAILED"
    assert final.exit_code == 3
    assert "boom" in logs.getvalue()
    assert "exit code 3" in final.message


@pytest.mark.cluster
def test_project_runs_from_the_unpacked_working_dir_with_the_token_from_the_env(token_head, auth_env, monkeypatch):
    """The project is not pip-installed on the cluster: it imports from the uploaded folder.

    The job also calls cluster.connect() (RAY_ADDRESS inside a job) on the token cluster.
    The client finds the token through RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE unset.
    """
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_head.token_path))
    probe = (
        "import os; from cluster import connect; info = connect(); "
        "print('CONNECTED', info.embedded, info.nodes, info.auth_mode, os.path.exists('.git'), flush=True)"
    )
    logs = io.StringIO()
    outcome = jobs.submit_entrypoint(
        shlex.join(["python", "-c", probe]),
        address=token_head.dashboard_url,
        working_dir=REPO_ROOT,
        stream=logs,
    )
    assert outcome.exit_code == 0, logs.getvalue()
    assert "CONNECTED False 1 token False" in logs.getvalue()


@pytest.mark.cluster
def test_agentforge_cli_runs_as_a_job(token_head, auth_env):
    if not (REPO_ROOT / "coordinator" / "cli.py").exists():
        pytest.skip("coordinator/cli.py is not written yet")
    logs = io.StringIO()
    outcome = jobs.submit(
        ["run", "--help"], address=token_head.dashboard_url, working_dir=REPO_ROOT, token=token_head.token, stream=logs
    )
    assert jobs.agentforge_entrypoint(["run", "--help"]) == "python -m coordinator.cli run --help"
    assert outcome.exit_code == 0, logs.getvalue()
    assert "usage: agentforge run" in logs.getvalue()


@pytest.mark.cluster
@pytest.mark.slow
def test_in_place_working_dir_needs_no_upload(token_head, auth_env, tmp_path):
    """``local://`` (what the KubeRay manifest uses): the job runs in a folder already on the node.
    Slow (about 8 s); default-run sibling: the unpacked working dir test above (a job runs the
    project with the token from the environment)."""
    folder = tmp_path / "in-place"
    folder.mkdir()
    logs = io.StringIO()
    outcome = jobs.submit_entrypoint(
        "pwd",
        address=token_head.dashboard_url,
        working_dir=None,
        runtime_env={"working_dir": f"local://{folder}"},
        token=token_head.token,
        stream=logs,
    )
    assert outcome.exit_code == 0, logs.getvalue()
    assert str(folder) in logs.getvalue()


@pytest.mark.cluster
def test_missing_token_is_an_authentication_error(token_head, auth_env):
    with pytest.raises(ClusterError) as caught:
        jobs.submit_entrypoint("echo hi", address=token_head.dashboard_url, working_dir=None)
    message = str(caught.value)
    assert "authentication" in message and token_head.dashboard_url in message
    assert "RAY_AUTH_MODE=token" in message and "ray get-auth-token" in message


@pytest.mark.cluster
def test_wrong_token_is_rejected_by_the_cluster(token_head, auth_env):
    with pytest.raises(ClusterError, match="authentication") as caught:
        jobs.submit_entrypoint("echo hi", address=token_head.dashboard_url, working_dir=None, token="not-the-token")
    assert isinstance(caught.value.__cause__, ray.exceptions.AuthenticationError)


@pytest.mark.cluster
def test_explicit_address_beats_ray_address_env(token_head, auth_env, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.255.255.1:6379")  # a job driver's GCS address
    outcome = jobs.submit_entrypoint(
        "true", address=token_head.dashboard_url, working_dir=None, token=token_head.token, follow=False
    )
    assert outcome.address == token_head.dashboard_url
    assert os.environ["RAY_ADDRESS"] == "10.255.255.1:6379", "the env must be restored"


def test_unreachable_dashboard_fails_fast(auth_env):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach") as caught:
        jobs.submit(["run", "configs/small.yaml"], address=url, working_dir=None)
    assert time.monotonic() - started < 15
    assert url in str(caught.value)


@pytest.mark.cluster
def test_command_line_no_wait_json(token_head, auth_env, capsys):
    code = jobs.main(
        ["--address", token_head.dashboard_url, "--token", token_head.token, "--working-dir", str(REPO_ROOT),
         "--no-wait", "--json", "--", "status", "--help"]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["job_id"].startswith("raysubmit_") and last["exit_code"] is None
    final = jobs.follow_job(last["job_id"], address=token_head.dashboard_url, token=token_head.token, logs=False)
    if (REPO_ROOT / "coordinator" / "cli.py").exists():
        assert final.exit_code == 0, final.message


def test_command_line_reports_cluster_errors_on_one_line(auth_env, capsys):
    code = jobs.main(["--address", f"http://127.0.0.1:{free_port()}", "--no-upload", "--", "run", "configs/small.yaml"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("agentforge submit: cannot reach") and len(err.splitlines()) == 1


def test_token_lookup_follows_rays_order(auth_env, monkeypatch, tmp_path):
    home_token = auth_env / ".ray" / "auth_token"
    home_token.parent.mkdir()
    home_token.write_text("from-home\n")
    assert jobs.resolve_token() == ("from-home", str(home_token))

    path_token = tmp_path / "token"
    path_token.write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert jobs.resolve_token()[0] == "from-path"

    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.resolve_token()[0] == "from-env"
    assert jobs.resolve_token("explicit") == ("explicit", "the token argument")

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.resolve_token()[0] is None
    assert jobs.resolve_token("explicit")[0] == "explicit"


def test_empty_token_path_is_an_error_like_in_ray(auth_env, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(empty))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH"):
        jobs.resolve_token()


def test_address_resolution(auth_env, monkeypatch):
    assert jobs.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert jobs.resolve_address() == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "api:8265")
    assert jobs.resolve_address() == "http://api:8265"
    assert jobs.resolve_address("https://other:443") == "https://other:443"
    with pytest.raises(ClusterError, match="Ray Client"):
        jobs.resolve_address("ray://head:10001")


def test_entrypoint_quotes_arguments():
    assert jobs.agentforge_entrypoint(["run", "configs/small.yaml", "--set", "name=a b"]) == (
        "python -m coordinator.cli run configs/small.yaml --set 'name=a b'"
    )


@pytest.mark.cluster
@pytest.mark.slow
def test_agentforge_submit_runs_the_tiny_pipeline_on_a_token_cluster(token_head, auth_env, tmp_path):
    """The acceptance path: `agentforge submit -- run --preset tiny` against `ray start --head`
    with token auth; the job ends SUCCEEDED and the run folder (shared disk) holds the result.
    Default-run siblings: test_agentforge_cli_runs_as_a_job (the CLI in a job on this cluster)
    and the e2e README run (the pipeline)."""
    import subprocess

    from tests.conftest import agentforge_cmd, cli_env

    out = tmp_path / "run"
    env = cli_env(RAY_AUTH_TOKEN=token_head.token, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [*agentforge_cmd(), "submit", "--address", token_head.dashboard_url, "--working-dir", str(REPO_ROOT),
         "--json", "--", "run", "--preset", "tiny", "--out", str(out), "--wandb", "disabled",
         # phases 1-2, shortened: this tests the job path (Ray tasks and a Tune search inside a job
         # driver), not the training; phase 8's team, and its check that the cluster has the CPUs
         # its agents reserve, are tested in tests/coordinator/test_compress_phase.py
         "--phases", "1-2",
         "--set", "cognate.warmup_steps=20", "--set", "cognate.steps=10", "--set", "cognate.checkpoint_every=10",
         "--set", "evomerge.population=4", "--set", "evomerge.max_generations=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "SUCCEEDED"
    result = json.loads((out / "01_cognate" / "result.json").read_text())
    assert result["success"] and len(result["models"]) == 3
    assert json.loads((out / "02_evomerge" / "result.json").read_text())["success"]
    assert not (out / "08_compress").exists()
