"""EvoMerge's error, in a module without torch so the genome and the config import light."""

from __future__ import annotations

from coordinator.errors import ConfigError

__all__ = ["MergeError"]


class MergeError(ConfigError):
    """Bad merge input: unknown method, wrong number of models, missing or invalid parameters,
    or tensors that do not line up (the message names the tensor and the shapes)."""
