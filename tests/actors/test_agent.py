"""The Agent actor contract on a real local Ray: names, codec messages, checkpoint/restore across a
Ray restart, sha256 verification, chaos hooks, portable errors; plus the specs as data (no Ray)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch

from actors.base import (
    AgentSpec,
    ChaosPlan,
    DeadlineExceeded,
    InjectedFault,
    TeamSpec,
    actor_name,
    get_agent,
    make_request,
    read_reply,
    spawn,
    spawn_team,
    wait_ready,
)
from actors.roles import get_role, register_role, role_names
from coordinator.errors import (
    AgentForgeError,
    AgentUnavailableError,
    ArtifactError,
    ConfigError,
    PhaseError,
)
from serialization import sha256_file

NAMESPACE = "agentforge-tests"


@register_role("test-phase-failure")
class PhaseFailureRole:
    """Raises a PhaseError, whose (phase, message) constructor does not survive pickling."""

    def handle(self, task, payload, inputs):
        raise PhaseError("baking", f"task {task} failed on purpose")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        return None


def call(handle, task, payload=None, inputs=None, **kw):
    import ray

    return read_reply(ray.get(handle.handle.remote(make_request(task, payload, inputs, **kw)), timeout=60))


def wait_restarted(handle, old_pid: int, timeout_s: float = 30.0) -> dict:
    """Heartbeat until a new process answers (calls racing the restart fail, as Ray documents)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            beat = ray.get(handle.heartbeat.remote(), timeout=10)
            if beat["pid"] != old_pid:
                return beat
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"actor did not restart within {timeout_s} s")


@pytest.fixture(scope="module")
def team(ray_local, tmp_path_factory):
    """Three agents of the demo roles at 0.25 CPU each, in one team of one run."""
    run_id = f"t{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("ckpt")
    spec = TeamSpec(name="demo", agents=[{"role": r, "num_cpus": 0.25} for r in ("echo", "accumulator", "noop")])
    handles = spawn_team(spec, run_id=run_id, checkpoint_root=root, namespace=NAMESPACE)
    # Started beside the team (worker start-up dominates on 2 cores), used by one test.
    failing = spawn({"role": "test-phase-failure", "num_cpus": 0.25}, run_id=run_id, team="other",
                    checkpoint_root=root, namespace=NAMESPACE)
    infos = wait_ready({**handles, "failing": failing}, timeout_s=60)
    return {"run_id": run_id, "root": root, "handles": handles, "infos": infos, "spec": spec, "failing": failing}


# --- specs as data (no Ray) ---------------------------------------------------------------------

def test_specs_validate_and_name_every_problem():
    with pytest.raises(ConfigError) as err:
        AgentSpec(role="a/b", num_cpus=-1, resources={"CPU": 1}, options={"name": "x"})
    keys = {k for k, _ in err.value.problems}
    assert keys == {"role", "num_cpus", "resources", "options"}
    with pytest.raises(ConfigError, match="roles must be unique"):
        TeamSpec(name="t", agents=[{"role": "echo"}, {"role": "echo"}])
    with pytest.raises(ConfigError, match="agents.0.bogus"):
        TeamSpec(name="t", agents=[{"role": "echo", "bogus": 1}])
    team = TeamSpec(name="t", agents=[{"role": "echo", "num_cpus": 0.25}], tasks=("opaque",))
    assert team.roles == ("echo",) and team.tasks == ("opaque",) and team.agent("echo").num_cpus == 0.25
    with pytest.raises(KeyError, match="its roles: echo"):
        team.agent("nope")
    opts = AgentSpec(role="echo", max_restarts=None).ray_options(name="r/t/echo", namespace="ns")
    assert opts["max_restarts"] == 3 and opts["max_task_retries"] == 0 and opts["lifetime"] is None
    with pytest.raises(ConfigError, match="unknown agent role 'nope'; valid roles: .*accumulator.*echo.*noop"):
        get_role("nope")
    assert {"echo", "noop", "accumulator", "test-phase-failure"} <= set(role_names())


def test_role_registry_refuses_duplicates_and_unimportable_classes():
    with pytest.raises(ConfigError, match="already registered"):
        register_role("echo")(PhaseFailureRole)
    register_role("test-phase-failure")(PhaseFailureRole)  # a worker re-importing the module: fine

    def make_local():
        class Local:
            def handle(self, task, payload, inputs):
                return None
        return Local

    with pytest.raises(ConfigError, match="importable module"):
        register_role("test-local")(make_local())
    with pytest.raises(ConfigError, match="invalid role name"):
        register_role("../escape")


def test_chaos_plan_is_a_pure_function_of_seed_role_task_attempt():
    plan = ChaosPlan(seed=7, raise_rate=0.3, delay_rate=0.2, crash_rate=0.1)
    decisions = [plan.decide("echo", f"t{i}", 0) for i in range(400)]
    assert decisions == [ChaosPlan(seed=7, raise_rate=0.3, delay_rate=0.2, crash_rate=0.1).decide("echo", f"t{i}", 0)
                         for i in range(400)]
    assert decisions != [ChaosPlan(seed=8, raise_rate=0.3, delay_rate=0.2, crash_rate=0.1).decide("echo", f"t{i}", 0)
                         for i in range(400)]
    counts = {k: decisions.count(k) for k in ("crash", "raise", "delay", None)}
    assert 20 <= counts["crash"] <= 60 and 90 <= counts["raise"] <= 150 and 55 <= counts["delay"] <= 105
    retries = [plan.decide("echo", f"t{i}", 1) for i in range(400)]
    assert retries != decisions  # a retry (attempt + 1) draws anew
    assert ChaosPlan(seed=7, raise_rate=1.0, only_roles=("noop",)).decide("echo", "t0", 0) is None
    with pytest.raises(ConfigError, match="must be <= 1"):
        ChaosPlan(raise_rate=0.6, crash_rate=0.6)


# --- real Ray ---------------------------------------------------------------------------------

def test_named_actors_are_listed_with_run_team_role(team):
    import ray

    names = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
    for role in ("echo", "accumulator", "noop"):
        name = actor_name(team["run_id"], "demo", role)
        assert (NAMESPACE, name) in names
        assert team["infos"][role]["name"] == name and team["infos"][role]["spec"]["num_cpus"] == 0.25
        assert get_agent(team["run_id"], "demo", role, namespace=NAMESPACE)._actor_id == team["handles"][role]._actor_id
    with pytest.raises(AgentUnavailableError, match="no live agent"):
        get_agent(team["run_id"], "demo", "missing", namespace=NAMESPACE)


def test_handle_round_trips_tensors_through_the_codec(team):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    payload = {"x": x, "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "tag": ("a", 1)}
    reply = call(team["handles"]["echo"], "t-echo", payload, {"up": {"w": torch.ones(2, 2, dtype=torch.int8)}}, attempt=2)
    out = reply["output"]
    assert torch.equal(out["payload"]["x"], x) and out["payload"]["b"].dtype == torch.bfloat16
    assert torch.equal(out["payload"]["b"], payload["b"]) and out["payload"]["tag"] == ("a", 1)
    assert torch.equal(out["inputs"]["up"]["w"], torch.ones(2, 2, dtype=torch.int8))
    assert reply["agent"] == "echo" and reply["task"] == "t-echo" and reply["attempt"] == 2
    assert reply["pid"] == team["infos"]["echo"]["pid"] and reply["node_id"] and reply["duration_s"] >= 0
    assert reply["restored_from"] is None


def test_checkpoint_then_crash_restart_restores_the_latest_checkpoint(team):
    import ray

    acc = team["handles"]["accumulator"]
    call(acc, "a1", torch.tensor([1.0, 2.0]))
    at_ckpt = call(acc, "a2", torch.tensor([10.0, 20.0]))["output"]
    ckpt = ray.get(acc.checkpoint.remote("c1"))
    assert ckpt["sha256"] == sha256_file(ckpt["path"]) and Path(ckpt["path"]).parent.name == "c1"
    call(acc, "a3", torch.tensor([100.0, 100.0]))  # after the checkpoint: lost by the crash
    old = ray.get(acc.info.remote())
    ray.kill(acc, no_restart=False)  # a crash: Ray restarts it (max_restarts=3) and re-runs __init__
    wait_restarted(acc, old["pid"])
    info = ray.get(acc.info.remote())
    assert info["reconstructed"] is True and info["restarts"] >= 1 and info["restored_from"] == "c1"
    probe = call(acc, "probe")["output"]  # payload None adds nothing, counts one task
    assert torch.equal(probe["total"], at_ckpt["total"]) and probe["count"] == at_ckpt["count"] + 1


def test_restore_verifies_sha256_and_leaves_state_untouched(team):
    import ray

    acc = team["handles"]["accumulator"]
    call(acc, "b1", torch.tensor([5.0, 5.0]))
    good = ray.get(acc.checkpoint.remote("c2"))
    before = call(acc, "probe-before")["output"]
    data = bytearray(Path(good["path"]).read_bytes())
    data[-3] ^= 0x10  # one bit of the tensor payload
    Path(good["path"]).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch") as err:
        ray.get(acc.restore.remote("c2"))
    assert good["path"] in str(err.value)
    after = call(acc, "probe-after")["output"]
    assert torch.equal(after["total"], before["total"]) and after["count"] == before["count"] + 1
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        ray.get(acc.restore.remote("c1", "0" * 64))  # the caller's recorded hash is checked too
    restored = ray.get(acc.restore.remote("c1"))
    assert restored["tag"] == "c1"
    latest = (Path(team["root"]) / "accumulator" / "_latest.json").read_text()
    assert '"c1"' in latest  # a rollback moves the restart pointer back


def test_deadline_and_project_errors_cross_the_boundary(team):
    from coordinator.errors import PhaseError

    with pytest.raises(DeadlineExceeded) as err:
        call(team["handles"]["echo"], "late", deadline=time.time() - 5)
    assert err.value.before_execution and err.value.late_s >= 5
    # Our errors pickle with their fields (coordinator.errors), so they arrive as themselves.
    with pytest.raises(PhaseError, match="failed on purpose") as err:
        call(team["failing"], "x")
    assert err.value.phase == "baking"


def test_spawn_refuses_a_taken_name_and_replace_recreates(team):
    import ray

    with pytest.raises(AgentForgeError, match="already exists"):
        spawn({"role": "noop", "num_cpus": 0.25}, run_id=team["run_id"], team="demo",
              checkpoint_root=team["root"], namespace=NAMESPACE)
    old_pid = team["infos"]["noop"]["pid"]
    new = spawn({"role": "noop", "num_cpus": 0.25}, run_id=team["run_id"], team="demo",
                checkpoint_root=team["root"], namespace=NAMESPACE, replace=True)
    info = ray.get(new.info.remote(), timeout=60)
    assert info["pid"] != old_pid and info["reconstructed"] is False
    team["handles"]["noop"], team["infos"]["noop"] = new, info


def test_chaos_faults_are_reproducible_and_a_crash_kills_the_process(team):
    import ray

    echo = team["handles"]["echo"]
    plan = ChaosPlan(seed=11, raise_rate=0.5)
    ray.get(echo.set_chaos.remote(plan.model_dump()))
    runs = []
    for _ in range(2):
        raised = []
        for i in range(12):
            try:
                call(echo, f"c{i}")
                raised.append(False)
            except InjectedFault as exc:
                assert exc.before_execution and exc.task == f"c{i}"
                raised.append(True)
        runs.append(raised)
    assert runs[0] == runs[1] == [plan.decide("echo", f"c{i}", 0) == "raise" for i in range(12)]
    assert 0 < sum(runs[0]) < 12
    ray.get(echo.set_chaos.remote(None))

    noop = team["handles"]["noop"]
    old_pid = ray.get(noop.info.remote())["pid"]
    ray.get(noop.set_chaos.remote(ChaosPlan(crash_rate=1.0, only_roles=("noop",)).model_dump()))
    with pytest.raises(ray.exceptions.RayActorError):
        call(noop, "boom")
    beat = wait_restarted(noop, old_pid)  # Ray restarted it; set_chaos is not persisted
    assert beat["restarts"] >= 1 and call(noop, "fine")["output"] is None


class _NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def test_exceptions_that_cannot_cross_become_a_named_stand_in():
    import threading

    from actors.base import AgentTaskError, _portable

    plain = RuntimeError("fine")
    assert _portable(plain, "r", "t") is plain
    rebuilt = _portable(_NeedsTwo(1, 2), "r", "t")  # its __init__ cannot be called with the message alone
    assert isinstance(rebuilt, AgentTaskError) and "_NeedsTwo" in str(rebuilt)
    locked = RuntimeError("has a lock")
    locked.lock = threading.Lock()  # cannot be pickled
    assert isinstance(_portable(locked, "r", "t"), AgentTaskError)
