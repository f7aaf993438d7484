"""Bounds a decoder enforces on untrusted input, and the tensor dtypes the wire format knows.

:class:`Limits` caps message size, nesting depth, container, str and bytes lengths, tensor
size and the dtypes accepted; :data:`DEFAULT_LIMITS` is what :func:`serialization.unpackb`
and :class:`serialization.StreamDecoder` use unless told otherwise. :data:`SUPPORTED_DTYPES`
names the dtypes (torch-style: "float32", "bfloat16", "float8_e4m3fn", ...) that tensors and
arrays may carry; the private table behind it maps each name to its numpy and torch types.
Imports numpy, never msgpack; torch only when a tensor dtype is first resolved, so processes
that never touch a tensor (agent actors, the coordinator) start without it (about 2 s less
per actor start or restart on a 2-core machine).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

__all__ = ["DEFAULT_LIMITS", "SUPPORTED_DTYPES", "Limits"]

_KiB, _MiB, _GiB = 1 << 10, 1 << 20, 1 << 30


# --- dtypes ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Dtype:
    name: str
    itemsize: int
    numpy: np.dtype | None  # little-endian numpy dtype; None where numpy has no such type

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch); None where this torch build lacks it."""
        return _torch_dtype(self.name)


_NUMPY_NAMES = {"bool": "|b1", "int8": "|i1", "uint8": "|u1", "int16": "<i2", "uint16": "<u2",
                "int32": "<i4", "uint32": "<u4", "int64": "<i8", "uint64": "<u8",
                "float16": "<f2", "float32": "<f4", "float64": "<f8",
                "complex64": "<c8", "complex128": "<c16"}
# Dtypes only torch has, with their item sizes (fixed by the formats, so known without torch).
_TORCH_ONLY_ITEMSIZE = {"bfloat16": 2, "complex32": 4, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1,
                        "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1}

_DTYPES = {**{n: _Dtype(n, np.dtype(s).itemsize, np.dtype(s)) for n, s in _NUMPY_NAMES.items()},
           **{n: _Dtype(n, size, None) for n, size in _TORCH_ONLY_ITEMSIZE.items()}}
# The wire format's dtype vocabulary. A tensor of a dtype this torch build lacks (an old torch
# without float8) fails to encode or decode with an error naming it.
SUPPORTED_DTYPES: frozenset[str] = frozenset(_DTYPES)
_NUMPY_TO_NAME = {d.numpy.str: d.name for d in _DTYPES.values() if d.numpy is not None}


@functools.cache
def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name, None)


@functools.cache
def torch_to_name() -> dict[Any, str]:
    """torch dtype -> wire name, for the dtypes this torch build has (imports torch)."""
    return {d.torch: d.name for d in _DTYPES.values() if d.torch is not None}


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", _GiB), ("MiB", _MiB), ("KiB", _KiB)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"



# --- limits ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces on untrusted input.

    Args:
        max_message_bytes: largest whole message (header + body + payload).
        max_depth: deepest nesting of arrays and maps (at most 1000: msgpack's own stack).
        max_container_len: most items in one array or map (a tuple's marker counts as one).
        max_str_len: longest str, in UTF-8 bytes.
        max_bin_len: longest bytes value.
        max_tensor_bytes: largest single tensor or array payload.
        allowed_dtypes: dtype names accepted; a subset of :data:`SUPPORTED_DTYPES`.
    """

    max_message_bytes: int = 2 * _GiB
    max_depth: int = 64
    max_container_len: int = 1_000_000
    max_str_len: int = 256 * _MiB
    max_bin_len: int = 2 * _GiB
    max_tensor_bytes: int = 2 * _GiB
    allowed_dtypes: frozenset[str] = SUPPORTED_DTYPES

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "allowed_dtypes" and (type(value) is not int or value < 1):
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")
        if self.max_depth > 1000:
            raise ValueError(f"Limits.max_depth must be <= 1000 (msgpack's stack), got {self.max_depth}")
        allowed = frozenset(self.allowed_dtypes)
        unknown = sorted(allowed - SUPPORTED_DTYPES)
        if unknown:
            raise ValueError(f"Limits.allowed_dtypes has unknown dtypes {unknown}; "
                             f"valid: {sorted(SUPPORTED_DTYPES)}")
        object.__setattr__(self, "allowed_dtypes", allowed)


DEFAULT_LIMITS = Limits()
