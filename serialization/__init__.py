"""Agent Forge serialization: the msgpack wire codec and checkpoint/artifact IO.

- :mod:`serialization.codec`: ``packb``/``pack_parts``/``unpackb`` for messages carrying
  tensors, arrays, tuples, datetimes and registered dataclasses, safe on hostile input; the
  wire format is documented there.
- :mod:`serialization.stream`: ``StreamDecoder``, the codec for bytes that arrive in chunks.
- :mod:`serialization.registry`: the dataclass allow-list (``register_dataclass``).
- :mod:`serialization.limits`: ``Limits`` on untrusted input and ``SUPPORTED_DTYPES``.
- :mod:`serialization.errors`: ``DecodeError`` and ``EncodeError``.
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

# Public name -> the module that defines it, imported on first access.
_LAZY_NAMES = {
    "DEFAULT_LIMITS": "serialization.limits",
    "DecodeError": "serialization.errors",
    "EncodeError": "serialization.errors",
    "Limits": "serialization.limits",
    "StreamDecoder": "serialization.stream",
    "SUPPORTED_DTYPES": "serialization.limits",
    "WIRE_VERSION": "serialization.codec",
    "pack_parts": "serialization.codec",
    "packb": "serialization.codec",
    "register_dataclass": "serialization.registry",
    "registered_dataclasses": "serialization.registry",
    "unpackb": "serialization.codec",
    "unregister_dataclass": "serialization.registry",
}

__all__ = [
    *_LAZY_NAMES,
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
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'serialization' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
