"""Ray actor agent teams: the Agent actor contract and the role registry.

- :mod:`actors.base`: ``AgentSpec``/``TeamSpec``/``ChaosPlan`` (data), the ``Agent`` actor
  (handle a codec message, heartbeat, checkpoint/restore, chaos hooks), ``spawn``/``spawn_team``.
- :mod:`actors.roles`: ``@register_role`` and the role protocol; demo roles ``noop``, ``echo``,
  ``accumulator``.

Team packages (baking, adas, compression) add one module per role; roles are thin and call
``phases/``. Names load lazily (PEP 562), so ``import actors.roles`` does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY_NAMES = {
    **{name: "actors.base" for name in (
        "AgentSpec", "TeamSpec", "ChaosPlan", "InjectedFault", "DeadlineExceeded", "AgentTaskError",
        "CheckpointError", "Agent", "AgentActor", "actor_name", "spawn", "spawn_team", "get_agent",
        "wait_ready", "make_request", "read_reply", "DEFAULT_MAX_RESTARTS", "DEFAULT_NAMESPACE")},
    **{name: "actors.roles" for name in (
        "Role", "RoleContext", "register_role", "register_lazy_role", "role_names", "role_path", "get_role")},
}

__all__ = list(_LAZY_NAMES)


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
