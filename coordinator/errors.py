"""The small error hierarchy of Agent Forge.

Every error a user can see derives from :class:`AgentForgeError` and carries a message that
names the field, file, phase or agent involved. The hierarchy is deliberately flat
(CONVENTIONS.md, rule 8): config, phase, artifact, serialization, agent-unavailable,
circuit-open. This module imports nothing heavy so that ``phases/`` (plain PyTorch) and
``serialization/`` can raise these without pulling in Ray.
"""

from __future__ import annotations

__all__ = [
    "AgentForgeError",
    "ConfigError",
    "PhaseError",
    "PhaseNotBuiltError",
    "ArtifactError",
    "AgentUnavailableError",
    "CircuitOpenError",
]


class AgentForgeError(Exception):
    """Base class of every error Agent Forge raises on purpose."""


class ConfigError(AgentForgeError, ValueError):
    """A config file or value is invalid.

    ``problems`` lists every problem found, each as ``(key_path, message)``, so that a whole
    file's errors are reported at once.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])

    def __reduce__(self):  # Ray pickles exceptions across processes; keep the structured fields
        return (type(self), (str(self), self.problems))


class PhaseError(AgentForgeError):
    """A phase failed. ``phase`` names it."""

    def __init__(self, phase: str, message: str):
        super().__init__(f"phase {phase!r}: {message}")
        self.phase = phase
        self._message = message

    def __reduce__(self):  # Ray pickles exceptions across processes; rebuild from the fields
        return (_rebuild, (type(self), str(self), {"phase": self.phase}))


class PhaseNotBuiltError(PhaseError):
    """The phase exists in the pipeline's plan but its algorithm is not built yet."""

    def __init__(self, phase: str, issue: int | None = None, hint: str = ""):
        where = f" (tracked in issue #{issue})" if issue is not None else ""
        extra = f"; {hint}" if hint else ""
        super().__init__(phase, f"this phase is not built yet{where}; it produces no output{extra}")
        self.issue = issue


class ArtifactError(AgentForgeError):
    """An artifact is missing, unreadable, or its sha256 does not match the recorded one."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path

    def __reduce__(self):  # Ray pickles exceptions across processes; rebuild from the fields
        return (_rebuild, (type(self), str(self), {"path": self.path}))


def _rebuild(cls: type, message: str, fields: dict) -> Exception:
    """Recreate an error with its final message and fields, without re-running ``__init__``."""
    err = Exception.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(fields)
    return err


class AgentUnavailableError(AgentForgeError):
    """An agent actor cannot be reached (dead, restarting, or its node is gone)."""


class CircuitOpenError(AgentUnavailableError):
    """An agent's circuit breaker is open: the call failed fast without reaching the actor."""
