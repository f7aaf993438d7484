"""The codec's error types: DecodeError for bytes it cannot read, EncodeError for objects it cannot write.

Both are :class:`~coordinator.errors.AgentForgeError` (CONVENTIONS.md rule 8) and also the
builtin a caller would expect (``ValueError``, ``TypeError``). They sit in their own module so
that :mod:`serialization.codec` and :mod:`serialization.stream` raise the same classes.
"""

from __future__ import annotations

from coordinator.errors import AgentForgeError

__all__ = ["DecodeError", "EncodeError"]


class DecodeError(AgentForgeError, ValueError):
    """Bytes could not be decoded: malformed, truncated, over a limit, or not ours."""


class EncodeError(AgentForgeError, TypeError):
    """An object cannot be encoded; the message names its type and where it sits."""

