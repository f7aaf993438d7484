"""The msgpack wire codec: messages with tensors, arrays, tuples, datetimes and dataclasses.

Messages between the coordinator, agent actors and Tune trials are encoded with
:func:`packb` and decoded with :func:`unpackb` (or :class:`~serialization.stream.StreamDecoder`
for bytes that arrive in chunks). Decoding treats its input as hostile: anything malformed,
truncated, oversized or too deep raises :class:`DecodeError` naming what is wrong, never another exception type; no
allocation is larger than the input (tensor buffers are sized from bytes that are present),
and nothing is imported or executed because the data named it. Never pickle.

Wire format, version 1 (:data:`WIRE_VERSION`). All integers little-endian::

    offset 0   4 bytes   magic b"AFMP"
           4   u8        wire format version (1); a decoder refuses versions it does not know
           5   u8        flags, must be 0
           6   u16       reserved, must be 0
           8   u64       body_len: length of the msgpack body
          16   u64       payload_len: length of the payload section
          24   body      one msgpack object: the message
               padding   zeros up to a multiple of 64 from the frame start (only if payload_len > 0)
               payload   the raw bytes of every tensor and array, each at a 64-byte aligned offset

Keeping raw buffers out of the msgpack body (like pickle protocol 5's out-of-band buffers)
is what makes the codec copy-free on encode: the output is one ``b"".join`` of the header,
the body and memoryviews of the tensors' own storage. Decoding copies each buffer once into
memory the result owns (or, in :class:`~serialization.stream.StreamDecoder`, views the frame
buffer it assembled).

Inside the body, plain msgpack carries None, bool, int (-2**63 .. 2**64-1), float (64-bit),
str, bytes (bytearray and memoryview encode as bytes), list and dict. Ext types (code: data):

    1 torch.Tensor    msgpack [dtype, shape, offset, nbytes]; the bytes live in the payload
    2 numpy.ndarray   same descriptor as 1
    3 numpy scalar    msgpack [dtype, raw little-endian bytes]
    4 tuple marker    empty; an array whose first item is this marker is a tuple of the rest
    5 dataclass       UTF-8 registered name; an array [marker, {field: value}] is an instance
    6 datetime        msgpack [year, month, day, hour, minute, second, microsecond, fold, tz],
                      tz = None (naive) | offset_us (datetime.timezone) |
                           [offset_us, name] (named timezone) | "Area/City" (zoneinfo key)
   -1 msgpack timestamp: never written; read as an aware UTC datetime for interoperability

dtype names are those in :data:`~serialization.limits.SUPPORTED_DTYPES` (torch-style: "float32",
"bfloat16", "float8_e4m3fn", ...). Payloads are C-order little-endian; bfloat16 and float8 travel as
their raw bits. Dict keys may be any encodable value that decodes to something hashable
(str, int, bytes, float, bool, None, datetime, numpy scalars, tuples of these); a map key that
decodes to an unhashable value, or a map with duplicate keys, is a DecodeError. Only exact
types are encoded (an IntEnum or a namedtuple is an EncodeError; convert it first), except
that tensor and ndarray subclasses (nn.Parameter, np.memmap) encode as their base type.
Nesting depth counts msgpack arrays and maps: a tuple is one level, a dataclass two.

Around this module: :mod:`serialization.limits` (Limits, the dtype table),
:mod:`serialization.registry` (the dataclass allow-list), :mod:`serialization.errors`
(DecodeError, EncodeError) and :mod:`serialization.stream` (StreamDecoder).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
import struct
import sys
import zoneinfo
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from typing import Any

import msgpack
import numpy as np

from serialization.errors import DecodeError, EncodeError
from serialization.limits import (
    _DTYPES,
    _NUMPY_TO_NAME,
    torch_to_name,
    DEFAULT_LIMITS,
    Limits,
    _Dtype,
    _fmt_bytes,
)
from serialization.registry import _BY_CLASS, _BY_NAME

__all__ = ["WIRE_VERSION", "pack_parts", "packb", "unpackb"]

WIRE_VERSION = 1
MAGIC = b"AFMP"
_HEADER = struct.Struct("<4sBBHQQ")
HEADER_SIZE = _HEADER.size  # 24
_ALIGN = 64
_ZEROS = bytes(_ALIGN)
EXT_TENSOR, EXT_NDARRAY, EXT_NPSCALAR, EXT_TUPLE, EXT_DATACLASS, EXT_DATETIME = 1, 2, 3, 4, 5, 6
_EXT_NAMES = {1: "tensor", 2: "ndarray", 3: "numpy scalar", 4: "tuple", 5: "dataclass", 6: "datetime"}
_MAX_EXT_LEN = 4096  # our ext data are small descriptors; the payloads live outside the body
_MAX_NDIM = 32
_TORCH_ALLOC_MIN = 1 << 20  # below this, numpy's allocator is the faster way to get a buffer
_MAX_ENCODE_DEPTH = 500  # where the error locator stops, well inside Python's recursion limit


# --- encoding --------------------------------------------------------------------------------

_TUPLE_EXT = msgpack.ExtType(EXT_TUPLE, b"")


class _Encoder:
    """Per-message state: the ``default`` hook for msgpack's packer and the out-of-band buffers."""

    def __init__(self) -> None:
        self.buffers: list[tuple[int, Any]] = []  # (payload offset, uint8 array viewing the data)
        self.cursor = 0

    def default(self, obj: Any) -> Any:
        # torch loads lazily (serialization.limits): in a process that never imported it, no
        # object can be a tensor.
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._buffer(EXT_TENSOR, *_tensor_bytes(obj))
        t = type(obj)
        if t is tuple:
            return [_TUPLE_EXT, *obj]
        if isinstance(obj, np.ndarray) and not isinstance(obj, np.ma.MaskedArray):
            return self._buffer(EXT_NDARRAY, *_array_bytes(obj))
        if isinstance(obj, np.generic):
            name = _NUMPY_TO_NAME.get(obj.dtype.str)
            if name is None:
                raise EncodeError(f"numpy scalar dtype {obj.dtype} is not supported; "
                                  f"supported: {sorted(_NUMPY_TO_NAME.values())}")
            return msgpack.ExtType(EXT_NPSCALAR, msgpack.packb([name, obj.tobytes()]))
        if t is _dt.datetime:
            return msgpack.ExtType(EXT_DATETIME, _datetime_bytes(obj))
        entry = _BY_CLASS.get(t)
        if entry is not None:
            return [msgpack.ExtType(EXT_DATACLASS, entry.name.encode()),
                    {f: getattr(obj, f) for f in entry.fields}]
        if dataclasses.is_dataclass(obj):
            raise EncodeError(f"dataclass {t.__qualname__} is not registered; decorate it with "
                              f"@register_dataclass('name')")
        raise EncodeError(f"cannot encode object of type {t.__qualname__}")

    def _buffer(self, code: int, name: str, shape: tuple[int, ...], raw: np.ndarray) -> msgpack.ExtType:
        offset = 0
        if raw.nbytes:
            offset = -(-self.cursor // _ALIGN) * _ALIGN
            self.buffers.append((offset, raw))
            self.cursor = offset + raw.nbytes
        return msgpack.ExtType(code, msgpack.packb([name, list(shape), offset, raw.nbytes]))


def _tensor_bytes(t: Any) -> tuple[str, tuple[int, ...], np.ndarray]:
    import torch

    names = torch_to_name()
    name = names.get(t.dtype)
    if name is None:
        raise EncodeError(f"tensor dtype {t.dtype} is not supported; supported: {sorted(names.values())}")
    if t.layout is not torch.strided or t.is_quantized or t.is_nested:
        raise EncodeError(f"only dense tensors can be encoded, not layout {t.layout}")
    try:
        if t.requires_grad:
            t = t.detach()
        if not t.is_cpu:
            t = t.cpu()
        # A conj()/neg view keeps its flag lazily; its raw bytes would be the un-negated data.
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        if _DTYPES[name].numpy is not None:
            return name, tuple(t.shape), t.numpy().reshape(-1).view(np.uint8)  # views, no copy
        # bfloat16/float8 have no numpy dtype: reinterpret the bytes in torch first. A tensor
        # of 0 or 1 elements counts as contiguous whatever its stride, which view() refuses.
        flat = t.reshape(-1)
        if flat.numel() == 0:
            return name, tuple(t.shape), np.empty(0, np.uint8)
        if flat.stride(0) != 1:
            flat = flat.clone(memory_format=torch.contiguous_format)
        return name, tuple(t.shape), flat.view(torch.uint8).numpy()
    except RuntimeError as exc:
        raise EncodeError(f"cannot read tensor of dtype {t.dtype} on {t.device}: {exc}") from exc


def _array_bytes(arr: np.ndarray) -> tuple[str, tuple[int, ...], np.ndarray]:
    arr = np.asarray(arr)
    dtype = arr.dtype
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("<")
        arr = arr.astype(dtype)  # the wire is little-endian
    name = _NUMPY_TO_NAME.get(dtype.str)
    if name is None:
        raise EncodeError(f"numpy dtype {arr.dtype} is not supported; "
                          f"supported: {sorted(_NUMPY_TO_NAME.values())}")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return name, arr.shape, arr.reshape(-1).view(np.uint8)


def _datetime_bytes(d: _dt.datetime) -> bytes:
    tz = d.tzinfo
    if tz is None:
        wire_tz: Any = None
    elif isinstance(tz, zoneinfo.ZoneInfo):
        if tz.key is None:
            raise EncodeError("a ZoneInfo without a key (ZoneInfo.from_file) cannot be encoded; "
                              "use ZoneInfo(key) or datetime.timezone")
        wire_tz = tz.key
    elif type(tz) is _dt.timezone:
        offset = tz.utcoffset(None) // _dt.timedelta(microseconds=1)
        # An explicit name only matters if it differs from the one timezone(offset) would show.
        named = tz.tzname(None) != _dt.timezone(tz.utcoffset(None)).tzname(None)
        wire_tz = [offset, tz.tzname(None)] if named else offset
    else:
        raise EncodeError(f"datetime tzinfo of type {type(tz).__qualname__} is not supported; "
                          f"use datetime.timezone or zoneinfo.ZoneInfo")
    data = msgpack.packb([d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, d.fold, wire_tz])
    if len(data) > _MAX_EXT_LEN:
        raise EncodeError(f"datetime timezone name is too long ({len(data)} bytes encoded, at most {_MAX_EXT_LEN})")
    return data


def _frame_parts(obj: Any) -> list[Any]:
    enc = _Encoder()
    packer = msgpack.Packer(default=enc.default, use_bin_type=True, strict_types=True,
                            datetime=False, buf_size=4096)
    try:
        body = packer.pack(obj)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        where = _locate(obj, "", 0, set())
        if where is None:
            raise EncodeError(f"cannot encode message: {exc}") from exc
        raise EncodeError(f"at {where[0] or '<root>'}: {where[1]}") from exc
    parts: list[Any] = [_HEADER.pack(MAGIC, WIRE_VERSION, 0, 0, len(body), enc.cursor), body]
    pos = HEADER_SIZE + len(body)
    if enc.buffers:
        start = -(-pos // _ALIGN) * _ALIGN
        parts.append(_ZEROS[: start - pos])
        pos = 0
        for offset, raw in enc.buffers:
            if offset > pos:
                parts.append(_ZEROS[: offset - pos])
            parts.append(raw.data)
            pos = offset + raw.nbytes
    return parts


def packb(obj: Any) -> bytes:
    """Encode ``obj`` as one message.

    Tensor and array bytes are copied once, straight from their storage into the result.

    Raises:
        EncodeError: an object cannot be encoded; the message names its path and type.
    """
    return b"".join(_frame_parts(obj))


def pack_parts(obj: Any) -> list[bytes | memoryview]:
    """Encode ``obj`` as a list of buffers whose concatenation is ``packb(obj)``, copying nothing.

    For writing a large message to a file or socket (``writelines``, ``sendmsg``) without
    building it in memory. The memoryviews alias the tensors' storage: write them out before
    mutating the tensors.

    Raises:
        EncodeError: as :func:`packb`.
    """
    return _frame_parts(obj)


def _locate(obj: Any, path: str, depth: int, active: set[int]) -> tuple[str, str] | None:
    """Find the first part of ``obj`` that cannot be encoded: (path, reason), or None."""
    if depth > _MAX_ENCODE_DEPTH:
        return path, f"nesting deeper than {_MAX_ENCODE_DEPTH} levels"
    t = type(obj)
    if t is int:
        return None if -(2**63) <= obj < 2**64 else (path, f"integer {obj} is outside msgpack's range [-2**63, 2**64)")
    if t is str:
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, f"str is not encodable as UTF-8: {exc}"
        return None
    if t in (type(None), bool, float, bytes, bytearray, memoryview):
        return None
    if t in (dict, list, tuple) or t in _BY_CLASS:
        if id(obj) in active:
            return path, f"circular reference to a {t.__qualname__}"
        active.add(id(obj))
        if t is dict:
            items = chain.from_iterable(((f"{path}<key {k!r}>", k), (f"{path}[{k!r}]", v)) for k, v in obj.items())
        elif t in (list, tuple):
            items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
        else:
            items = ((f"{path}.{f}", getattr(obj, f)) for f in _BY_CLASS[t].fields)
        for sub_path, value in items:
            found = _locate(value, sub_path, depth + 1, active)
            if found is not None:
                return found
        active.discard(id(obj))
        return None
    try:
        _Encoder().default(obj)
    except (EncodeError, TypeError, ValueError, OverflowError) as exc:
        return path, str(exc)
    return None



# --- decoding --------------------------------------------------------------------------------

# 1 for each byte that can start a msgpack array or map (fixmap, fixarray, array16/32, map16/32).
_CONTAINER_BYTES = bytes(int(0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF) for b in range(256))
_ZONE_KEY = re.compile(r"[A-Za-z0-9_+\-]{1,64}(/[A-Za-z0-9_+\-]{1,64}){0,3}")


class _TupleMark:
    __slots__ = ()


class _DataclassMark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_TUPLE_MARK = _TupleMark()


class _FrameDecoder:
    """Hooks for msgpack's unpacker, holding the state of one message's decode.

    Depth: each nesting level needs its own container header byte, so a body with at most
    ``max_depth`` bytes that could be such headers cannot be too deep and is decoded without
    tracking depth (the usual case, as tensor bytes live outside the body). Otherwise depth
    is computed bottom-up: msgpack calls a hook once a container's items are built, so its
    depth is 1 + the deepest of its items, looked up by id.

    Markers: ``marks`` counts tuple/dataclass markers made minus markers consumed as the
    first item of an array; anything left over at the end is a misplaced marker.
    """

    def __init__(self, limits: Limits, payload: memoryview, owner: np.ndarray | None,
                 track_depth: bool) -> None:
        self.limits = limits
        self.payload = payload
        self.owner = owner  # the payload as a writable array we own: tensors may view it
        self.track = track_depth
        self.depth: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps objects alive so their ids in self.depth stay theirs
        self.marks = 0
        self.claimed = 0

    def _record(self, obj: Any, items: Callable[[], Iterable[Any]]) -> None:
        """Note ``obj``'s depth; ``items()`` iterates its items (twice if any is a container)."""
        depth = self.depth
        # Most containers hold no containers: isdisjoint answers that at C speed.
        if depth.keys().isdisjoint(map(id, items())):
            level = 1
        else:
            level = 1 + max(map(depth.get, map(id, items()), repeat(0)))
            if level > self.limits.max_depth:
                raise DecodeError(f"nesting depth exceeds max_depth={self.limits.max_depth}")
        depth[id(obj)] = level
        self.keep.append(obj)

    def list_hook(self, items: list) -> Any:
        head = items[0] if items else None
        if head is _TUPLE_MARK:
            self.marks -= 1
            items = tuple(items[1:])
        elif type(head) is _DataclassMark:
            self.marks -= 1
            return self._dataclass(head.name, items)
        if self.track:
            self._record(items, lambda: items)
        return items

    def pairs_hook(self, pairs: list[tuple[Any, Any]]) -> dict:
        try:
            result = dict(pairs)
        except Exception as exc:  # a key's __hash__/__eq__ may be a registered class's code
            bad = next((k for k, _ in pairs if not _hashable(k)), None)
            if bad is None:
                raise DecodeError(f"map keys cannot be compared: {exc}") from None
            raise DecodeError(f"map key of type {type(bad).__name__} is not hashable") from None
        if len(result) != len(pairs):
            raise DecodeError(f"map has duplicate keys ({len(pairs)} entries, {len(result)} distinct)")
        if self.track:
            self._record(result, lambda: chain.from_iterable(pairs))
        return result

    def _dataclass(self, name: str, items: list) -> Any:
        if len(items) != 2 or type(items[1]) is not dict:
            raise DecodeError(f"dataclass {name!r} must be [marker, field map]")
        entry = _BY_NAME.get(name)
        if entry is None:
            raise DecodeError(f"unknown dataclass name {name!r}; registered names: {sorted(_BY_NAME)}")
        fields = items[1]
        unknown = [k for k in fields if k not in entry.fields]
        if unknown:
            raise DecodeError(f"dataclass {name!r} has no fields {unknown!r}; fields: {list(entry.fields)}")
        missing = sorted(entry.required - fields.keys())
        if missing:
            raise DecodeError(f"dataclass {name!r} is missing required fields {missing}")
        try:
            obj = entry.cls(**fields)
        except Exception as exc:  # the class's own __init__/__post_init__ may raise anything
            raise DecodeError(f"dataclass {name!r} rejected the decoded fields: {exc}") from exc
        if self.track:
            self._record(obj, lambda: (fields,))
        return obj

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code in (EXT_TENSOR, EXT_NDARRAY):
            return self._array(code, data)
        if code == EXT_NPSCALAR:
            return self._np_scalar(data)
        if code == EXT_TUPLE:
            if data:
                raise DecodeError(f"tuple marker carries {len(data)} unexpected bytes")
            self.marks += 1
            return _TUPLE_MARK
        if code == EXT_DATACLASS:
            try:
                mark = _DataclassMark(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise DecodeError(f"dataclass name {data[:64]!r} is not UTF-8") from None
            self.marks += 1
            return mark
        if code == EXT_DATETIME:
            return _decode_datetime(data)
        valid = ", ".join(f"{c} ({n})" for c, n in _EXT_NAMES.items())
        raise DecodeError(f"unknown ext type code {code}; valid codes: {valid}")

    def _dtype(self, name: Any, code: int) -> _Dtype:
        kind = _EXT_NAMES[code]
        spec = _DTYPES.get(name) if type(name) is str else None
        if spec is None:
            raise DecodeError(f"{kind} has unknown dtype {name!r}; valid: {sorted(_DTYPES)}")
        if name not in self.limits.allowed_dtypes:
            raise DecodeError(f"{kind} dtype {name!r} is not allowed; allowed: {sorted(self.limits.allowed_dtypes)}")
        if code == EXT_TENSOR and spec.torch is None:
            raise DecodeError(f"dtype {name!r} is not available in this torch build")
        if code != EXT_TENSOR and spec.numpy is None:
            raise DecodeError(f"dtype {name!r} has no numpy equivalent; it can only travel as a tensor")
        return spec

    def _array(self, code: int, data: bytes) -> Any:
        desc = _unpack_small(data, "tensor descriptor")
        if type(desc) is not list or len(desc) != 4:
            raise DecodeError(f"{_EXT_NAMES[code]} descriptor must be [dtype, shape, offset, nbytes], got {desc!r:.200}")
        name, shape, offset, nbytes = desc
        spec = self._dtype(name, code)
        if type(shape) is not list or len(shape) > _MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
            raise DecodeError(f"{_EXT_NAMES[code]} shape must be a list of at most {_MAX_NDIM} "
                              f"non-negative ints, got {shape!r:.200}")
        shape = tuple(shape)
        need = math.prod(shape) * spec.itemsize
        if type(nbytes) is not int or nbytes != need:
            raise DecodeError(f"{_EXT_NAMES[code]} shape {shape} {name} needs {need} bytes "
                              f"but the descriptor says {nbytes!r}")
        if need > self.limits.max_tensor_bytes:
            raise DecodeError(f"{_EXT_NAMES[code]} of shape {shape} {name} = {_fmt_bytes(need)} exceeds "
                              f"max_tensor_bytes={self.limits.max_tensor_bytes}")
        size = len(self.payload)
        if type(offset) is not int or not 0 <= offset <= size:
            raise DecodeError(f"{_EXT_NAMES[code]} payload offset {offset!r} is outside the "
                              f"{size}-byte payload section")
        if need > size - offset:
            raise DecodeError(f"{_EXT_NAMES[code]} payload claims shape {shape} {name} = {_fmt_bytes(need)} "
                              f"but only {size - offset} bytes follow")
        if offset % _ALIGN:
            raise DecodeError(f"{_EXT_NAMES[code]} payload offset {offset} is not a multiple of {_ALIGN}")
        # Regions may alias; bounding their sum keeps output no larger than the input.
        self.claimed += need
        if self.claimed > size:
            raise DecodeError(f"tensors claim {self.claimed} payload bytes but the section holds {size}")
        storage = None
        if code == EXT_TENSOR:
            import torch
        if self.owner is not None:
            buf = self.owner[offset: offset + need]
        elif code == EXT_TENSOR and need >= _TORCH_ALLOC_MIN:
            # Large tensors take memory from torch's allocator and own their storage outright.
            # numpy's allocator asks for transparent huge pages from 4 MiB up, which measured
            # up to 10x slower to fault in on our VMs once memory had been freed and reused.
            storage = torch.empty(need, dtype=torch.uint8)
            buf = storage.numpy()
            buf[:] = np.frombuffer(self.payload[offset: offset + need], np.uint8)
        else:
            buf = np.empty(need, np.uint8)
            buf[:] = np.frombuffer(self.payload[offset: offset + need], np.uint8)
        if spec.name == "bool" and need and buf.max() > 1:
            raise DecodeError("bool payload holds bytes other than 0 and 1")
        try:
            if code == EXT_NDARRAY:
                return buf.view(spec.numpy).reshape(shape)
            if storage is None:
                # An empty numpy buffer has stride 0, which view(dtype) rejects.
                storage = torch.from_numpy(buf) if need else torch.empty(0, dtype=torch.uint8)
            return storage.view(spec.torch).reshape(shape)
        except (ValueError, RuntimeError, TypeError, OverflowError) as exc:
            raise DecodeError(f"cannot build {_EXT_NAMES[code]} of shape {shape} {name}: {exc}") from exc

    def _np_scalar(self, data: bytes) -> Any:
        desc = _unpack_small(data, "numpy scalar")
        if type(desc) is not list or len(desc) != 2 or type(desc[1]) is not bytes:
            raise DecodeError(f"numpy scalar must be [dtype, bytes], got {desc!r:.200}")
        spec = self._dtype(desc[0], EXT_NPSCALAR)
        raw = desc[1]
        if len(raw) != spec.itemsize:
            raise DecodeError(f"numpy scalar {spec.name} needs {spec.itemsize} bytes, got {len(raw)}")
        if spec.name == "bool" and raw[0] > 1:
            raise DecodeError("numpy bool scalar holds a byte other than 0 and 1")
        return np.frombuffer(raw, spec.numpy)[0]


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except Exception:  # __hash__ may be a registered class's code and raise anything
        return False
    return True


def _unpack_small(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, max_str_len=_MAX_EXT_LEN,
                               max_bin_len=64, max_array_len=64, max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"malformed {what}: {exc or type(exc).__name__}") from None


def _decode_datetime(data: bytes) -> _dt.datetime:
    v = _unpack_small(data, "datetime")
    if type(v) is not list or len(v) != 9 or any(type(x) is not int for x in v[:8]) or v[7] not in (0, 1):
        raise DecodeError(f"datetime must be 8 ints (fold 0 or 1) and a timezone, got {v!r:.200}")
    tz_wire = v[8]
    try:
        if tz_wire is None:
            tz = None
        elif type(tz_wire) is int:
            tz = _dt.timezone(_dt.timedelta(microseconds=tz_wire))
        elif type(tz_wire) is list and len(tz_wire) == 2 and type(tz_wire[0]) is int and type(tz_wire[1]) is str:
            tz = _dt.timezone(_dt.timedelta(microseconds=tz_wire[0]), tz_wire[1])
        elif type(tz_wire) is str and _ZONE_KEY.fullmatch(tz_wire):
            tz = zoneinfo.ZoneInfo(tz_wire)
        else:
            raise DecodeError(f"datetime timezone must be None, an offset, [offset, name] or a zone key, "
                              f"got {tz_wire!r:.100}")
        return _dt.datetime(*v[:7], tzinfo=tz, fold=v[7])
    except (ValueError, TypeError, OverflowError, KeyError, OSError) as exc:
        raise DecodeError(f"invalid datetime {v!r:.200}: {exc}") from None


def _parse_header(head: memoryview, limits: Limits) -> tuple[int, int, int]:
    """Validate a frame header; return (body_len, payload_start, frame_len)."""
    magic, version, flags, reserved, body_len, payload_len = _HEADER.unpack(head)
    if magic != MAGIC:
        raise DecodeError(f"not an Agent Forge message: expected magic {MAGIC!r}, got {magic!r}")
    if version != WIRE_VERSION:
        raise DecodeError(f"unsupported wire format version {version} (this decoder reads {WIRE_VERSION})")
    if flags or reserved:
        raise DecodeError(f"reserved header fields are set (flags={flags}, reserved={reserved})")
    if body_len == 0:
        raise DecodeError("message body is empty")
    end = HEADER_SIZE + body_len
    payload_start = -(-end // _ALIGN) * _ALIGN if payload_len else end
    frame_len = payload_start + payload_len
    if frame_len > limits.max_message_bytes:
        raise DecodeError(f"message of {_fmt_bytes(frame_len)} (body {body_len}, payload {payload_len} bytes) "
                          f"exceeds max_message_bytes={limits.max_message_bytes}")
    return body_len, payload_start, frame_len


# msgpack's own size checks, translated into our vocabulary: its key -> (what, Limits field).
_MSGPACK_LIMITS = {"max_array_len": ("array length", "max_container_len"),
                   "max_map_len": ("map length", "max_container_len"),
                   "max_str_len": ("str length", "max_str_len"),
                   "max_bin_len": ("bytes length", "max_bin_len"),
                   "max_ext_len": ("ext data length", None)}
_MSGPACK_LIMIT_RE = re.compile(r"(\d+) exceeds (max_\w+)\((\d+)\)")


def _limit_message(text: str, limits: Limits) -> str | None:
    m = _MSGPACK_LIMIT_RE.search(text)
    if m is None or m.group(2) not in _MSGPACK_LIMITS:
        return None
    what, field = _MSGPACK_LIMITS[m.group(2)]
    cap = int(m.group(3))
    if field is None:
        source = f"ext data is at most {_MAX_EXT_LEN} bytes"
    elif cap == getattr(limits, field):
        source = f"Limits.{field}={cap}"
    else:
        source = f"only {cap} bytes of body hold it"
    return f"{what} {m.group(1)} is over the limit ({source})"


def _decode_frame(frame: memoryview, body_len: int, payload_start: int, limits: Limits,
                  owner: np.ndarray | None) -> Any:
    body = frame[HEADER_SIZE: HEADER_SIZE + body_len]
    dec = _FrameDecoder(limits, frame[payload_start:], None if owner is None else owner[payload_start:],
                        track_depth=_may_nest_deeper(body, limits.max_depth))
    n = min(limits.max_container_len, body_len)
    try:
        obj = msgpack.unpackb(
            body, ext_hook=dec.ext_hook, list_hook=dec.list_hook, object_pairs_hook=dec.pairs_hook,
            raw=False, strict_map_key=False, use_list=True, timestamp=3,
            max_str_len=min(limits.max_str_len, body_len), max_bin_len=min(limits.max_bin_len, body_len),
            max_array_len=n, max_map_len=n, max_ext_len=_MAX_EXT_LEN)
    except DecodeError:
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError(f"{len(exc.extra)} bytes of trailing data inside the message body") from None
    except msgpack.StackError:
        raise DecodeError(f"nesting depth exceeds max_depth={limits.max_depth}") from None
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, RecursionError) as exc:
        text = str(exc) or type(exc).__name__
        raise DecodeError(_limit_message(text, limits) or f"malformed message body: {text}") from None
    if dec.marks:
        raise DecodeError("a tuple or dataclass marker appears where no container starts")
    return obj


def _may_nest_deeper(body: memoryview, max_depth: int) -> bool:
    """Whether ``body`` holds more than ``max_depth`` bytes that could open a container."""
    count = 0
    for start in range(0, len(body), 1 << 16):
        count += bytes(body[start: start + (1 << 16)]).translate(_CONTAINER_BYTES).count(1)
        if count > max_depth:
            return True
    return False


def _as_bytes_view(data: Any) -> memoryview:
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("not contiguous")
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"expected a contiguous bytes-like object, got {type(data).__name__}: {exc}") from None


def unpackb(data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode exactly one message.

    Args:
        data: the whole message; nothing may follow it.
        limits: bounds for untrusted input.
    Returns:
        The decoded object; tensors and arrays are writable, own their memory, are on CPU.
    Raises:
        DecodeError: for any malformed, truncated, oversized or hostile input.
    """
    view = _as_bytes_view(data)
    if len(view) < HEADER_SIZE:
        raise DecodeError(f"message truncated: {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
    body_len, payload_start, frame_len = _parse_header(view[:HEADER_SIZE], limits)
    if len(view) < frame_len:
        raise DecodeError(f"message truncated: the header declares {frame_len} bytes, only {len(view)} are present")
    if len(view) > frame_len:
        raise DecodeError(f"{len(view) - frame_len} bytes of trailing data after the {frame_len}-byte message")
    return _decode_frame(view, body_len, payload_start, limits, owner=None)
