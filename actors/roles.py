"""Agent roles: the registry of role classes by name, the role protocol, and three demo roles.

A role is a plain Python class that does one agent's work; the :class:`~actors.base.Agent`
actor is the shell around it (CONVENTIONS.md rules 1, 4 and 5: Ray Tune's Trainable becomes an
actor without knowing it). Roles never import Ray. The protocol::

    handle(task: str, payload, inputs: dict[str, Any]) -> Any    # the work; output via the codec
    state_dict() -> dict                                          # codec-encodable state
    load_state_dict(state: dict) -> None
    setup(context: RoleContext) -> None                           # optional, once per process

The registry is a dict plus a decorator (mergekit's merge-method registry). It maps a name to
the role's import path ``"module:qualname"``, because the registry is per process: an actor
worker finds its role by importing that path, which also runs the module's ``@register_role``.
Heavy roles (phases 6-8 pull in their phase code) are registered by path with
:func:`register_lazy_role`, so importing this module stays cheap; the class is imported on
first lookup.

Demo roles, deterministic and dependency-free, for tests, benchmarks and chaos drills on a real
cluster: ``noop`` (benchmarks), ``echo`` (a pure function of its message), ``accumulator``
(state that checkpoints and restores: a running total of numbers or tensors) and ``digest-1`` to
``digest-4`` (four interchangeable agents computing a hash chain: ``agentforge drill``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from coordinator.errors import ConfigError

__all__ = [
    "AccumulatorRole",
    "DigestRole",
    "StatelessRole",
    "EchoRole",
    "NoopRole",
    "Role",
    "RoleContext",
    "check_name",
    "get_role",
    "load_role_class",
    "name_problem",
    "register_lazy_role",
    "register_role",
    "role_names",
    "role_path",
]

# Role and team names appear in actor names (RUNID/team/role) and in checkpoint paths, so they
# are plain file names: no "/", no "." or ".." and no leading dot or dash.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")

_lock = threading.Lock()
_PATHS: dict[str, str] = {}  # name -> "module:qualname"
_CLASSES: dict[str, type] = {}  # name -> class, once imported

T = TypeVar("T", bound=type)


@runtime_checkable
class Role(Protocol):
    """What an agent role implements (``setup(context)`` is optional)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class RoleContext:
    """What a role's ``setup`` learns about where it runs.

    Attributes:
        run_id, team, role: the agent's identity (its actor name is ``run_id/team/role``).
        checkpoint_dir: this role's checkpoint folder (``checkpoint_root/role``), for roles that
            keep large artifacts beside their state.
        config: the role's own settings (``AgentSpec.config``), plain data.
        node_id: the Ray node the actor runs on.
        reconstructed: True when Ray restarted this actor (``__init__`` runs again).
    """

    run_id: str
    team: str
    role: str
    checkpoint_dir: str
    config: Mapping[str, Any] = field(default_factory=dict)
    node_id: str = ""
    reconstructed: bool = False


def name_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not a valid role or team name, or None when it is one."""
    if isinstance(value, str) and _NAME_RE.match(value):
        return None
    return (f"invalid {what} name {value!r}: use 1-100 letters, digits, '_', '.', '-', "
            "starting with a letter, digit or '_'")


def check_name(value: str, what: str) -> str:
    """Validate a role or team name (used in actor names and paths).

    Raises:
        ConfigError: naming ``what`` and the allowed form.
    """
    problem = name_problem(value, what)
    if problem:
        raise ConfigError(problem, [(what, problem)])
    return value


def _path_of(cls: type) -> str:
    module, qualname = cls.__module__, cls.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ConfigError(
            f"role class {qualname} is defined in {'__main__' if module == '__main__' else 'a function'}; "
            "an actor worker finds its role by import path, so define it at the top level of an "
            "importable module",
            [("role", f"{module}:{qualname} is not importable")],
        )
    return f"{module}:{qualname}"


def register_role(name: str) -> Callable[[T], T]:
    """Class decorator: register a role class under ``name``.

    Re-registering the same class (a worker importing the module again) is allowed; another
    class under a taken name is an error.

    Raises:
        ConfigError: the name is invalid or taken, or the class is not importable by path.
    """
    check_name(name, "role")

    def decorate(cls: T) -> T:
        if not callable(getattr(cls, "handle", None)):
            raise ConfigError(f"role {name!r}: {cls.__qualname__} has no handle(task, payload, inputs)",
                              [("role", "missing handle")])
        path = _path_of(cls)
        with _lock:
            if _PATHS.get(name, path) != path:
                raise ConfigError(f"role {name!r} is already registered as {_PATHS[name]}, not {path}",
                                  [("role", f"duplicate name {name!r}")])
            _PATHS[name] = path
            _CLASSES[name] = cls
        return cls

    return decorate


def register_lazy_role(name: str, path: str) -> None:
    """Register a role by import path ``"package.module:Class"`` without importing it now.

    Raises:
        ConfigError: invalid name or path, or the name is taken by another path.
    """
    check_name(name, "role")
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"role {name!r}: import path must look like 'package.module:Class', got {path!r}",
                          [("role", f"bad import path {path!r}")])
    with _lock:
        if _PATHS.get(name, path) != path:
            raise ConfigError(f"role {name!r} is already registered as {_PATHS[name]}, not {path}",
                              [("role", f"duplicate name {name!r}")])
        _PATHS[name] = path


def role_names() -> list[str]:
    """Every registered role name, sorted (imported or lazy)."""
    with _lock:
        return sorted(_PATHS)


def role_path(name: str) -> str:
    """The import path of a registered role.

    Raises:
        ConfigError: unknown role; the message lists the valid names.
    """
    with _lock:
        path = _PATHS.get(name)
    if path is None:
        valid = ", ".join(role_names()) or "(none registered)"
        raise ConfigError(f"unknown agent role {name!r}; valid roles: {valid}", [("role", f"unknown role {name!r}")])
    return path


def load_role_class(path: str) -> type:
    """Import a role class from ``"module:qualname"`` (inside an actor worker).

    Raises:
        ConfigError: the module or attribute cannot be imported.
    """
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import role class {path!r}: {exc}", [("role", f"cannot import {path!r}")]) from exc
    if not isinstance(obj, type):
        raise ConfigError(f"{path!r} is not a class", [("role", f"{path!r} is not a class")])
    return obj


def get_role(name: str) -> type:
    """The class of a registered role, importing a lazily registered one now.

    Raises:
        ConfigError: unknown role (valid names listed) or its import failed.
    """
    with _lock:
        cls = _CLASSES.get(name)
    if cls is not None:
        return cls
    cls = load_role_class(role_path(name))
    with _lock:
        _CLASSES[name] = cls
    return cls


# --- demo roles --------------------------------------------------------------------------------

class StatelessRole:
    """Base of roles with no state to checkpoint: empty state_dict, nothing to load."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@register_role("noop")
class NoopRole(StatelessRole):
    """Does nothing and returns None: the floor of per-task overhead in benchmarks."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        return None


@register_role("echo")
class EchoRole(StatelessRole):
    """Returns its message: a pure function, so replays and retries give equal outputs.

    A payload ``{"sleep_s": x, ...}`` sleeps ``x`` seconds first (a slow task, for deadlines).
    """

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        if isinstance(payload, dict) and isinstance(payload.get("sleep_s"), (int, float)):
            time.sleep(max(0.0, float(payload["sleep_s"])))
        return {"task": task, "payload": payload, "inputs": inputs}


@register_role("accumulator")
class AccumulatorRole:
    """Keeps a running total of its payloads (numbers or equal-shape tensors) and the task names.

    ``handle`` adds the payload and every input's ``"total"`` (when the input is such a reply)
    and returns ``{"total", "count"}``. Its state round-trips exactly through a checkpoint, which
    makes it the role that restart and rollback tests compare.
    """

    def __init__(self) -> None:
        self.total: Any = 0
        self.count = 0
        self.tasks: list[str] = []

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        addends = [payload] if payload is not None else []
        addends += [v["total"] for v in inputs.values() if isinstance(v, dict) and "total" in v]
        for value in addends:
            self.total = self.total + value
        self.count += 1
        self.tasks.append(task)
        return {"total": self.total, "count": self.count}

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count, "tasks": list(self.tasks)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count, self.tasks = state["total"], int(state["count"]), list(state["tasks"])


class DigestRole(StatelessRole):
    """sha256 of the task name, payload and input digests: a pure function with a 16-hex output,
    so a run with faults can be compared output by output with a fault-free one.

    A payload ``{"work_s": x}`` sleeps ``x`` seconds first, so that faults land mid-task.
    """

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        if isinstance(payload, dict) and isinstance(payload.get("work_s"), (int, float)):
            time.sleep(max(0.0, float(payload["work_s"])))
        text = json.dumps([task, payload, sorted(inputs.items())], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# A team has one agent per role, so the drill's four agents are four registered names.
@register_role("digest-1")
class Digest1(DigestRole):
    pass


@register_role("digest-2")
class Digest2(DigestRole):
    pass


@register_role("digest-3")
class Digest3(DigestRole):
    pass


@register_role("digest-4")
class Digest4(DigestRole):
    pass
