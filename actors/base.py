"""The Agent actor contract: one role per Ray actor, named ``RUNID/team/role``, declared as data.

An :class:`Agent` wraps a role (:mod:`actors.roles`): it decodes a task message with our codec,
calls ``role.handle``, encodes the reply, answers heartbeats, and checkpoints/restores the role's
state in the run folder. Teams are data (:class:`AgentSpec`, :class:`TeamSpec`); the coordinator
creates actors with :func:`spawn` and talks to them only through handles and messages.

Restart (Ray's fault-tolerance docs, "actor checkpointing", pattern b: the actor restores itself):
``max_restarts`` makes Ray recreate a crashed actor and re-run ``__init__`` with the same
arguments; ``__init__`` then loads the checkpoint that ``checkpoint_root/<role>/_latest.json``
points to and records ``ray.get_runtime_context().was_current_actor_reconstructed``.
``max_task_retries`` defaults to 0 (at-most-once): whether a task is replayed is the
coordinator's recovery policy, which knows if the task is idempotent; Ray's retry does not.

Lifetime: actors are non-detached by default, so they fate-share with their owner (the process
that called :func:`spawn`): if the pipeline driver dies, its agents die with it and release their
CPUs instead of lingering on the cluster. Ray still restarts them after a crash while the owner
lives. ``detached=True`` is for a team that must outlive its driver (it must then be killed
explicitly); both are named, so ``ray list actors`` and the dashboard show ``RUNID/team/role``.

Heartbeats run in their own concurrency group (``control``, one thread), so an agent busy with a
long task still answers them: a missed beat means the process is gone or hung, not busy.

Wire: requests and replies are ``serialization.packb`` bytes, never pickles of our objects
(Ray pickles the bytes object itself). Exceptions cross by Ray's pickling, so an exception a role
raises that cannot round-trip is replaced by :class:`AgentTaskError` naming its type.

Chaos (the actor side of fault injection): :class:`ChaosPlan` decides from
``sha256(seed, role, task, attempt)`` whether ``handle`` crashes the process (``os._exit``),
raises :class:`InjectedFault`, or sleeps, before the role runs: reproducible for a seed.
A restarted actor gets the plan it was spawned with (``set_chaos`` is not persisted).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from pydantic import Field, field_validator, model_validator

from actors.roles import RoleContext, load_role_class, name_problem, role_path
from coordinator.errors import AgentForgeError, AgentUnavailableError, ArtifactError
from phases.data.config import FrozenConfig
from serialization import DecodeError, packb, unpackb
from serialization.checkpoint import atomic_write_bytes, atomic_write_json, read_json

__all__ = [
    "DEFAULT_MAX_RESTARTS", "DEFAULT_NAMESPACE", "Agent", "AgentActor", "AgentSpec", "AgentTaskError", "ChaosPlan",
    "CheckpointError", "DeadlineExceeded", "InjectedFault", "TeamSpec", "actor_name", "get_agent", "make_request",
    "read_reply", "spawn", "spawn_team", "wait_ready",
]

# Ray restarts per actor when the team's recovery policy does not say (AgentSpec.max_restarts
# None). Bounded, like OTP's restart intensity, so a crash loop ends in RayActorError and the
# coordinator's policy (restart with a fresh actor, isolate, escalate) takes over.
DEFAULT_MAX_RESTARTS = 3
# The same namespace as cluster.connect.DEFAULT_NAMESPACE (a test checks); not imported from there
# because the cluster package loads the Jobs client, 0.3 s more on every actor (re)start.
DEFAULT_NAMESPACE = "agentforge"
CONTROL_GROUP = "control"
STATE_FILE, META_FILE, LATEST_FILE = "state.afmp", "meta.json", "_latest.json"
CHECKPOINT_FORMAT = 1
# Options that spawn() derives from the spec itself; AgentSpec.options may not set them.
_OWNED_OPTIONS = frozenset({"name", "namespace", "lifetime", "get_if_exists", "num_cpus", "num_gpus", "resources",
                            "max_restarts", "max_task_retries", "max_concurrency", "concurrency_groups"})


class AgentSpec(FrozenConfig):
    """One agent of a team: its role and how Ray places and restarts it."""

    role: str
    # Reserved for the actor's lifetime; fractional (0.25) packs four agents on a core.
    num_cpus: float = Field(1.0, ge=0, allow_inf_nan=False)
    num_gpus: float = Field(0.0, ge=0, allow_inf_nan=False)
    # Custom resources, e.g. {"node_a": 1} to pin an agent to a node.
    resources: dict[str, float] = Field(default_factory=dict)
    # Ray restarts after a crash; None: the team's policy sets it, else DEFAULT_MAX_RESTARTS; -1: forever.
    max_restarts: int | None = Field(None, ge=-1)
    # Ray's own replays of a task; 0 leaves replay decisions to the coordinator (it knows idempotence).
    max_task_retries: int = Field(0, ge=-1)
    # Threads serving handle(); > 1 needs a thread-safe role. Heartbeats have their own thread.
    max_concurrency: int = Field(1, ge=1)
    # The role's own settings (plain data), given to setup() as RoleContext.config.
    config: dict[str, Any] = Field(default_factory=dict)
    # Other Ray actor options, passed through (scheduling_strategy, label_selector, runtime_env, ...).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("role")
    @classmethod
    def _check_role(cls, v: str) -> str:
        problem = name_problem(v, "role")
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if key in ("CPU", "GPU", "memory"):
                raise ValueError(f"resource {key!r} is declared with num_cpus/num_gpus/options, not resources")
            if not (math.isfinite(amount) and amount >= 0):
                raise ValueError(f"resources[{key!r}] must be a finite number >= 0, got {amount!r}")
        return v

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(v) & _OWNED_OPTIONS)
        if owned:
            raise ValueError(f"options {owned} are set from the spec's own fields or spawn(); "
                             f"not allowed here: {sorted(_OWNED_OPTIONS)}")
        return v

    def ray_options(self, *, name: str, namespace: str, detached: bool = False) -> dict[str, Any]:
        """The ``ActorClass.options(...)`` for this agent."""
        restarts = DEFAULT_MAX_RESTARTS if self.max_restarts is None else self.max_restarts
        return {**self.options, "name": name, "namespace": namespace,
                "lifetime": "detached" if detached else None, "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus, "resources": dict(self.resources), "max_restarts": restarts,
                "max_task_retries": self.max_task_retries, "max_concurrency": self.max_concurrency}


class TeamSpec(FrozenConfig):
    """A team: a name, its agents (one per role) and its task graph.

    ``tasks`` is opaque here (``coordinator.dag.TaskSpec`` objects); ``coordinator.dag.TaskGraph``
    validates them against :attr:`roles`.
    """

    name: str
    agents: tuple[AgentSpec, ...]
    tasks: tuple[Any, ...] = ()

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        problem = name_problem(v, "team")
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _check_roles(self) -> TeamSpec:
        roles = [a.role for a in self.agents]
        if not roles:
            raise ValueError(f"team {self.name!r} has no agents")
        dupes = sorted({r for r in roles if roles.count(r) > 1})
        if dupes:
            raise ValueError(f"team {self.name!r}: roles must be unique, repeated: {dupes}")
        return self

    @property
    def roles(self) -> tuple[str, ...]:
        """The team's role names, in declaration order."""
        return tuple(a.role for a in self.agents)

    def agent(self, role: str) -> AgentSpec:
        """The spec of ``role``. Raises KeyError listing the team's roles."""
        for spec in self.agents:
            if spec.role == role:
                return spec
        raise KeyError(f"team {self.name!r} has no role {role!r}; its roles: {', '.join(self.roles)}")


class ChaosPlan(FrozenConfig):
    """Faults an agent injects into its own ``handle`` calls, decided per (seed, role, task, attempt).

    One uniform draw per call picks at most one fault: crash with probability ``crash_rate``,
    else raise with ``raise_rate``, else delay with ``delay_rate``. A retry (attempt + 1) draws anew.
    """

    seed: int = 0
    raise_rate: float = Field(0.0, ge=0, le=1)  # raise InjectedFault before the role runs
    delay_rate: float = Field(0.0, ge=0, le=1)  # sleep delay_s before the role runs (trips deadlines)
    delay_s: float = Field(0.5, ge=0, allow_inf_nan=False)
    crash_rate: float = Field(0.0, ge=0, le=1)  # os._exit(1): the process dies mid-call, as in a real crash
    only_roles: tuple[str, ...] = ()  # empty: every role

    @model_validator(mode="after")
    def _check_total(self) -> ChaosPlan:
        if self.crash_rate + self.raise_rate + self.delay_rate > 1.0 + 1e-12:
            raise ValueError("crash_rate + raise_rate + delay_rate must be <= 1 (one fault per call at most)")
        return self

    def draw(self, role: str, task: str, attempt: int) -> float:
        """A uniform number in [0, 1) fixed by (seed, role, task, attempt)."""
        key = f"{self.seed}\0{role}\0{task}\0{attempt}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64

    def decide(self, role: str, task: str, attempt: int) -> str | None:
        """``"crash"``, ``"raise"``, ``"delay"`` or None for this call."""
        if self.only_roles and role not in self.only_roles:
            return None
        u = self.draw(role, task, attempt)
        for kind, rate in (("crash", self.crash_rate), ("raise", self.raise_rate), ("delay", self.delay_rate)):
            if u < rate:
                return kind
            u -= rate
        return None


# --- errors that cross the actor boundary (each pickles by its constructor arguments) -------------

class InjectedFault(AgentForgeError):
    """A fault a ChaosPlan injected; raised before the role ran (``before_execution``)."""

    before_execution = True

    def __init__(self, role: str, task: str, attempt: int):
        super().__init__(f"injected fault (chaos) in agent {role!r}, task {task!r}, attempt {attempt}")
        self.role, self.task, self.attempt = role, task, attempt

    def __reduce__(self):
        return type(self), (self.role, self.task, self.attempt)


class DeadlineExceeded(AgentForgeError, TimeoutError):
    """The request's deadline had passed when the agent dequeued it; the role did not run."""

    before_execution = True

    def __init__(self, role: str, task: str, late_s: float):
        super().__init__(f"agent {role!r} got task {task!r} {late_s:.3f} s after its deadline; not run")
        self.role, self.task, self.late_s = role, task, late_s

    def __reduce__(self):
        return type(self), (self.role, self.task, self.late_s)


class AgentTaskError(AgentForgeError):
    """A role raised an exception that cannot cross the process boundary; this names it."""

    def __init__(self, role: str, task: str, exc_type: str, detail: str):
        super().__init__(f"agent {role!r}, task {task!r}: {exc_type}: {detail}")
        self.role, self.task, self.exc_type, self.detail = role, task, exc_type, detail

    def __reduce__(self):
        return type(self), (self.role, self.task, self.exc_type, self.detail)


class CheckpointError(ArtifactError):
    """An ArtifactError raised inside an agent (checkpoint or restore), in a form that pickles."""

    def __init__(self, path: str, detail: str):
        super().__init__(path, detail)
        self.detail = detail

    def __reduce__(self):
        return type(self), (self.path, self.detail)


def _portable(exc: BaseException, role: str, task: str) -> BaseException:
    """``exc`` itself when it survives Ray's pickling, else a picklable stand-in naming it."""
    if isinstance(exc, ArtifactError) and not isinstance(exc, CheckpointError):
        prefix = f"{exc.path}: "
        text = str(exc)
        return CheckpointError(exc.path, text.removeprefix(prefix))
    try:
        # Can Ray's transport (which pickles exceptions) carry it? Pickling shows unpicklable
        # attributes; rebuilding it from its own __reduce__ (what unpickling would call) shows a
        # class whose __init__ needs more than its message. Nothing is ever unpickled.
        ray.cloudpickle.dumps(exc)
        rebuild, args = exc.__reduce__()[:2]
        rebuild(*args)
        return exc
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, ImportError):
        detail = "".join(traceback.format_exception(exc)).rstrip()
        return AgentTaskError(role, task, f"{type(exc).__module__}.{type(exc).__qualname__}", detail)


def _num_restarts(actor_id: str, reconstructed: bool) -> int:
    # was_current_actor_reconstructed reads NumRestarts from the GCS actor table with this very
    # call (ray/runtime_context.py, l.461-471 in 2.60); Ray has no public accessor for the count.
    try:
        from ray._private.state import actors

        return int(actors(actor_id=actor_id)["NumRestarts"])
    except (ImportError, AttributeError, KeyError, TypeError):
        return int(reconstructed)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_tag(tag: str) -> str:
    problem = name_problem(tag, "checkpoint tag")
    if problem:
        raise ValueError(problem)
    return tag


class Agent:
    """The actor class (made remote as :data:`AgentActor`; create it with :func:`spawn`).

    Args:
        spec: ``AgentSpec.model_dump()``.
        role_class: the role's import path ``"module:qualname"`` (``roles.role_path``).
        run_id, team: the agent's identity.
        checkpoint_root: the team's checkpoint folder; this agent uses ``checkpoint_root/<role>``.
        chaos: ``ChaosPlan.model_dump()`` or None.
    Raises:
        CheckpointError: the latest checkpoint is missing, corrupt or fails its sha256 (the
            actor then fails to start: restarting with empty state would silently lose work).
    """

    def __init__(self, spec: dict, role_class: str, run_id: str, team: str, checkpoint_root: str,
                 chaos: dict | None = None):
        self._spec = AgentSpec.model_validate(spec)
        self._role_name, self._run_id, self._team = self._spec.role, run_id, team
        self._dir = Path(checkpoint_root) / self._role_name
        self._chaos = ChaosPlan.model_validate(chaos) if chaos else None
        ctx = ray.get_runtime_context()
        self._pid, self._node_id, self._actor_id = os.getpid(), ctx.get_node_id(), ctx.get_actor_id()
        with warnings.catch_warnings():
            # Ray 2.60's own property reads its deprecated ``actor_id`` internally and warns on
            # every actor start; the property itself is not deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._reconstructed = bool(ctx.was_current_actor_reconstructed)
        self._restarts = _num_restarts(self._actor_id, self._reconstructed)
        self._started = time.monotonic()
        self._lock = threading.Lock()  # one checkpoint/restore at a time, never mid-load
        self._seq = self._tasks_done = 0
        self._last_task: str | None = None
        self._running: str | None = None
        self._restored_from: str | None = None
        self._role = load_role_class(role_class)()
        if callable(getattr(self._role, "setup", None)):
            self._role.setup(RoleContext(run_id=run_id, team=team, role=self._role_name,
                                         checkpoint_dir=str(self._dir), config=dict(self._spec.config),
                                         node_id=self._node_id, reconstructed=self._reconstructed))
        latest = self._dir / LATEST_FILE
        if latest.exists():
            try:
                pointer = read_json(latest)
                self._restore(str(pointer["tag"]), str(pointer["sha256"]), move_latest=False)
            except (ArtifactError, KeyError, TypeError) as exc:
                raise _portable(exc if isinstance(exc, ArtifactError) else ArtifactError(
                    str(latest), f"malformed pointer: {exc!r}"), self._role_name, "__init__") from None

    def handle(self, message: bytes) -> bytes:
        """Run one task: request ``{task, payload, inputs, attempt, deadline}`` -> reply bytes.

        Reply: ``{output, agent, pid, node_id, duration_s, restored_from, task, attempt}``.
        Raises:
            DecodeError: a malformed request. DeadlineExceeded / InjectedFault: before the role
            ran. The role's own exception (or AgentTaskError naming it).
        """
        t0 = time.perf_counter()
        req = unpackb(message)
        if not isinstance(req, dict) or not isinstance(req.get("task"), str):
            raise DecodeError("request must be a map with a str 'task' (see actors.base.make_request)")
        task, attempt, inputs = req["task"], req.get("attempt", 0), req.get("inputs") or {}
        if not isinstance(attempt, int) or not isinstance(inputs, dict):
            raise DecodeError(f"request for task {task!r}: 'attempt' must be an int and 'inputs' a map")
        deadline = req.get("deadline")
        if deadline is not None and time.time() > deadline:
            raise DeadlineExceeded(self._role_name, task, time.time() - deadline)
        self._running = self._last_task = task
        try:
            fault = self._chaos.decide(self._role_name, task, attempt) if self._chaos else None
            if fault == "crash":
                os._exit(1)  # no cleanup, no reply: what a segfault or an OOM kill looks like
            elif fault == "raise":
                raise InjectedFault(self._role_name, task, attempt)
            elif fault == "delay":
                time.sleep(self._chaos.delay_s)
            try:
                output = self._role.handle(task, req.get("payload"), inputs)
            except Exception as exc:  # any role error: re-raised as is, or as a picklable stand-in
                portable = _portable(exc, self._role_name, task)
                if portable is exc:
                    raise
                raise portable from None
        finally:
            self._running = None
        self._tasks_done += 1
        return packb({"output": output, "agent": self._role_name, "pid": self._pid, "node_id": self._node_id,
                      "duration_s": time.perf_counter() - t0, "restored_from": self._restored_from,
                      "task": task, "attempt": attempt})

    @ray.method(concurrency_group=CONTROL_GROUP)
    def heartbeat(self) -> dict:
        """Liveness and identity: answered even while ``handle`` runs (own thread)."""
        self._seq += 1
        return {"role": self._role_name, "team": self._team, "pid": self._pid, "node_id": self._node_id,
                "seq": self._seq, "uptime_s": time.monotonic() - self._started, "restarts": self._restarts,
                "reconstructed": self._reconstructed, "last_task": self._last_task, "running": self._running,
                "tasks_done": self._tasks_done, "restored_from": self._restored_from, "time": time.time()}

    def checkpoint(self, tag: str) -> dict:
        """Write the role's state to ``checkpoint_root/<role>/<tag>/`` and make it the latest.

        Layout: ``state.afmp`` (codec bytes), ``meta.json`` (its sha256, written after it), then
        ``../_latest.json`` (the restart pointer, written last). Every write is atomic.
        Returns:
            ``{"tag", "path", "sha256", "bytes"}``.
        Raises:
            ValueError: a bad tag. CheckpointError: the write failed. EncodeError: the state
            holds something the codec cannot encode.
        """
        _check_tag(tag)
        tag_dir = self._dir / tag
        try:
            with self._lock:
                data = packb({"format": CHECKPOINT_FORMAT, "role": self._role_name, "tag": tag,
                              "state": self._role.state_dict()})
                sha = atomic_write_bytes(tag_dir / STATE_FILE, data)
                atomic_write_json(tag_dir / META_FILE, {
                    "format": CHECKPOINT_FORMAT, "run_id": self._run_id, "team": self._team, "role": self._role_name,
                    "tag": tag, "file": STATE_FILE, "sha256": sha, "bytes": len(data), "created": _now_iso(),
                    "tasks_done": self._tasks_done})
                atomic_write_json(self._dir / LATEST_FILE, {"tag": tag, "sha256": sha})
        except ArtifactError as exc:
            raise _portable(exc, self._role_name, "checkpoint") from None
        return {"tag": tag, "path": str(tag_dir / STATE_FILE), "sha256": sha, "bytes": len(data)}

    def restore(self, tag: str, expected_sha256: str | None = None) -> dict:
        """Load checkpoint ``tag`` after verifying its sha256, and make it the latest.

        The state is decoded in full before the role sees it, so a failed restore leaves the
        role untouched. It becomes the restart pointer: after a rollback, a crash must come back
        to the rolled-back state, not to a newer checkpoint.
        Returns:
            ``{"tag", "path", "sha256"}``.
        Raises:
            CheckpointError: missing files, sha256 mismatch (with ``meta.json`` or with
            ``expected_sha256``), undecodable or another role's state.
        """
        _check_tag(tag)
        try:
            return self._restore(tag, expected_sha256, move_latest=True)
        except ArtifactError as exc:
            raise _portable(exc, self._role_name, "restore") from None

    def _restore(self, tag: str, expected_sha256: str | None, *, move_latest: bool) -> dict:
        tag_dir = self._dir / tag
        path = tag_dir / STATE_FILE
        meta = read_json(tag_dir / META_FILE)
        sha = meta.get("sha256") if isinstance(meta, dict) else None
        if expected_sha256 is not None and sha != expected_sha256:
            raise ArtifactError(str(tag_dir / META_FILE), f"sha256 mismatch: expected {expected_sha256}, recorded {sha}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(str(path), f"cannot read: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise ArtifactError(str(path), f"sha256 mismatch: expected {sha}, got {actual}")
        try:
            obj = unpackb(data)
        except DecodeError as exc:
            raise ArtifactError(str(path), f"undecodable checkpoint: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("role") != self._role_name or "state" not in obj:
            raise ArtifactError(str(path), f"not a checkpoint of role {self._role_name!r}")
        with self._lock:
            self._role.load_state_dict(obj["state"])
            self._restored_from = tag
            if move_latest:
                atomic_write_json(self._dir / LATEST_FILE, {"tag": tag, "sha256": sha})
        return {"tag": tag, "path": str(path), "sha256": sha}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def set_chaos(self, plan: Mapping[str, Any] | None) -> dict | None:
        """Replace the chaos plan (``ChaosPlan.model_dump()``; None turns chaos off)."""
        self._chaos = ChaosPlan.model_validate(dict(plan)) if plan else None
        return None if self._chaos is None else self._chaos.model_dump()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def info(self) -> dict:
        """Identity, placement, restart and checkpoint facts of this agent."""
        return {"name": actor_name(self._run_id, self._team, self._role_name), "run_id": self._run_id,
                "team": self._team, "role": self._role_name, "actor_id": self._actor_id, "pid": self._pid,
                "node_id": self._node_id, "namespace": ray.get_runtime_context().namespace,
                "reconstructed": self._reconstructed, "restarts": self._restarts,
                "restored_from": self._restored_from, "checkpoint_dir": str(self._dir),
                "role_class": f"{type(self._role).__module__}:{type(self._role).__qualname__}",
                "spec": self._spec.model_dump(), "chaos": None if self._chaos is None else self._chaos.model_dump()}


# The control group's single thread serves heartbeats, info and set_chaos beside handle()'s threads.
AgentActor = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(Agent)


def actor_name(run_id: str, team: str, role: str) -> str:
    """``RUNID/team/role``: the actor's name in its namespace."""
    return f"{run_id}/{team}/{role}"


def _check_identity(run_id: str, team: str, role: str) -> None:
    if not isinstance(run_id, str) or not run_id or "/" in run_id or len(run_id) > 200:
        raise ValueError(f"run_id must be a non-empty str of at most 200 characters without '/', got {run_id!r}")
    for value, what in ((team, "team"), (role, "role")):
        problem = name_problem(value, what)
        if problem:
            raise ValueError(problem)


def get_agent(run_id: str, team: str, role: str, namespace: str = DEFAULT_NAMESPACE):
    """The handle of a live agent. Raises AgentUnavailableError when there is none."""
    name = actor_name(run_id, team, role)
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise AgentUnavailableError(f"no live agent {name!r} in namespace {namespace!r}") from exc


def _remove_existing(name: str, namespace: str, timeout_s: float) -> None:
    try:
        old = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return
    ray.kill(old, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the GCS frees the name once the actor is DEAD
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.02)
    raise AgentUnavailableError(f"agent {name!r} was killed but its name was not released within {timeout_s} s")


def spawn(spec: AgentSpec | Mapping[str, Any], *, run_id: str, team: str, checkpoint_root: str | os.PathLike,
          namespace: str = DEFAULT_NAMESPACE, chaos: ChaosPlan | Mapping[str, Any] | None = None,
          detached: bool = False, replace: bool = False, replace_timeout_s: float = 30.0):
    """Create the agent actor ``RUNID/team/role`` (it restores its latest checkpoint itself).

    Args:
        spec: the agent (an AgentSpec or its dict form).
        run_id, team: identity; the name is ``run_id/team/spec.role``.
        checkpoint_root: the team's checkpoint folder, reachable from every node.
        namespace: the Ray namespace of all agents.
        chaos: the actor-side fault plan, or None.
        detached: outlive the owner (see the module docstring); kill it explicitly.
        replace: kill a live actor of the same name first (the restart strategy).
        replace_timeout_s: how long to wait for that name to be released.
    Returns:
        The actor handle (creation is asynchronous; :func:`wait_ready` waits for it).
    Raises:
        ConfigError: invalid spec, unknown role (valid names listed) or chaos plan.
        ValueError: invalid run_id or team. AgentForgeError: the name is taken and not replace.
    """
    spec = spec if isinstance(spec, AgentSpec) else AgentSpec.from_dict(spec)
    _check_identity(run_id, team, spec.role)
    plan = None if chaos is None else (chaos if isinstance(chaos, ChaosPlan) else ChaosPlan.from_dict(chaos))
    path = role_path(spec.role)
    name = actor_name(run_id, team, spec.role)
    if replace:
        _remove_existing(name, namespace, replace_timeout_s)
    options = spec.ray_options(name=name, namespace=namespace, detached=detached)
    try:
        return AgentActor.options(**options).remote(spec.model_dump(), path, run_id, team, os.fspath(checkpoint_root),
                                                    None if plan is None else plan.model_dump())
    except ray.exceptions.ActorAlreadyExistsError as exc:
        raise AgentForgeError(f"agent {name!r} already exists in namespace {namespace!r}; "
                              "pass replace=True to recreate it, or get_agent() to use it") from exc


def spawn_team(team: TeamSpec, *, run_id: str, checkpoint_root: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """:func:`spawn` every agent of ``team`` (same keyword arguments). Returns role -> handle."""
    return {spec.role: spawn(spec, run_id=run_id, team=team.name, checkpoint_root=checkpoint_root, **kwargs)
            for spec in team.agents}


def wait_ready(agents: Mapping[str, Any], timeout_s: float = 60.0) -> dict[str, dict]:
    """Wait until every agent answers ``info()``; returns role -> info.

    Raises:
        AgentUnavailableError: naming the agents not ready within ``timeout_s`` or dead.
    """
    refs = {role: handle.info.remote() for role, handle in agents.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready_set = set(ready)
    missing = [role for role, ref in refs.items() if ref not in ready_set]
    if missing:
        raise AgentUnavailableError(f"agents {missing} not ready within {timeout_s} s")
    try:
        return {role: ray.get(ref) for role, ref in refs.items()}
    except ray.exceptions.RayActorError as exc:
        raise AgentUnavailableError(f"an agent died while starting: {exc}") from exc


def make_request(task: str, payload: Any = None, inputs: Mapping[str, Any] | None = None, *,
                 attempt: int = 0, deadline: float | None = None) -> bytes:
    """Encode a task request for :meth:`Agent.handle`. ``deadline``: ``time.time()`` seconds."""
    return packb({"task": task, "payload": payload, "inputs": dict(inputs or {}), "attempt": attempt,
                  "deadline": deadline})


def read_reply(data: bytes) -> dict:
    """Decode :meth:`Agent.handle`'s reply. Raises DecodeError on malformed bytes."""
    reply = unpackb(data)
    if not isinstance(reply, dict) or "output" not in reply:
        raise DecodeError("an agent reply must be a map with an 'output' key")
    return reply
