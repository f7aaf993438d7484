"""Agent Forge serialization: the msgpack wire codec and checkpoint/artifact IO.

- :mod:`serialization.codec`: ``packb``/``unpackb``/``StreamDecoder`` for messages carrying
  tensors, arrays, tuples, datetimes and registered dataclasses, safe on hostile input.
- :mod:`serialization.checkpoint`: atomic writes, sha256 of files and directories,
  deterministic safetensors, JSON, and verification that raises ``ArtifactError``.

The codec's names load lazily (PEP 562): ``phases/`` saves checkpoints through this package
but must not import msgpack (CONVENTIONS.md rule 1), so importing the package or its
checkpoint names does not import the codec.
"""

from __future__ import annotations

import importlib
from typing import Any

from serialization.checkpoint import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    sha256_dir,
    sha256_file,
    sha256_path,
    verify,
)

_CODEC_NAMES = (
    "DEFAULT_LIMITS",
    "DecodeError",
    "EncodeError",
    "Limits",
    "StreamDecoder",
    "SUPPORTED_DTYPES",
    "WIRE_VERSION",
    "pack_parts",
    "packb",
    "register_dataclass",
    "registered_dataclasses",
    "unpackb",
    "unregister_dataclass",
)

__all__ = [
    *_CODEC_NAMES,
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_tensors",
    "read_json",
    "save_tensors",
    "sha256_dir",
    "sha256_file",
    "sha256_path",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _CODEC_NAMES:
        return getattr(importlib.import_module("serialization.codec"), name)
    raise AttributeError(f"module 'serialization' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
