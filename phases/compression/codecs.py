"""The weight codecs of phase 8 by name, behind one entry point: ``encode(weight, codec, settings)``.

A registry (a dict plus the :func:`register_codec` decorator, CONVENTIONS rule 4) maps a
codec name to a function ``(weight, **settings) -> stored tensor``. Every stored tensor has
``.numel``, ``.total_bits`` (every stored bit), ``.bits_per_weight``, ``.nbytes`` and
``.decompress()``. The codecs:

- ``"fp32"`` / ``"fp16"``: :class:`Dense`, the weight cast to that float type (32 / 16 bits
  per weight exactly); no settings.
- ``"int8"``: round-to-nearest (``rtn.py``), 8 bits, one scale and zero point per row
  (``group_size`` None) unless ``settings["group_size"]`` says otherwise.
- ``"int4"``: round-to-nearest, 4 bits, ``group_size`` 32 unless the settings say otherwise.
- ``"seedlm"``: SeedLM (``seedlm.py``); settings are passed to ``seedlm.compress`` (``block``,
  ``latent``, ``seed_bits``, ...).
- ``"vptq"``: VPTQ (``vptq.py``), 2-D weights only; settings are passed to ``vptq.compress``
  (``hessian``, ``vector_len``, ``centroids``, ``residual_centroids``, ...).
- ``"ternary"``: BitNet b1.58 trits (``ternary.py``), five per byte plus one scale per row;
  lossless on a weight that is already ternary (a BitNet layer), absmean-quantised otherwise;
  setting ``scale_dtype`` ("fp32", the default, or "fp16").

Sparsity is a keyword of :func:`encode`, not a setting (settings go to the codec untouched):
``encode(w, "int8", sparse=True)`` stores a pruned weight as a :class:`SparseTensor` (1-bit
keep-mask plus the nonzero values under the chosen codec) when that takes fewer bits than
dense storage (:func:`sparse_worthwhile`), and densely otherwise. In sparse form the kept values
are one flat vector, so ``"int8"`` without a ``group_size`` groups them by the weight's row
length (about one scale per row's worth of values). VPTQ is dense-only: its vectors run along
the output dim of a 2-D matrix, which a flat list of survivors does not have, so ``sparse=True``
is ignored for ``"vptq"``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from coordinator.errors import ConfigError
from phases.compression import rtn, seedlm, ternary, vptq
from phases.compression.sparse import SparseTensor, split
from phases.compression.stored import StoredBits

__all__ = ["CODECS", "SPARSE_CODECS", "Dense", "Stored", "encode", "get_codec", "planned_bits",
           "register_codec", "sparse_worthwhile"]


@runtime_checkable
class Stored(Protocol):
    """What every codec returns."""

    numel: int
    total_bits: int

    @property
    def bits_per_weight(self) -> float: ...

    @property
    def nbytes(self) -> int: ...

    def decompress(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Codec:
    """A registered codec: its function and the setting names it accepts."""

    name: str
    fn: Callable[..., Any]
    # a callable: pass-through codecs read their target's signature (None: it takes **kwargs)
    settings: Callable[[], frozenset[str] | None]
    sparse: bool  # whether the kept values of a pruned weight may be stored with it


CODECS: dict[str, Codec] = {}


def register_codec(name: str, *, settings: Iterable[str] | Callable[[], Iterable[str]] = (),
                   sparse: bool = True) -> Callable:
    """Decorator: register ``fn(weight, **settings) -> stored`` under ``name``.

    Args:
        settings: the setting names ``fn`` accepts, or a callable returning them.
        sparse: whether the codec can store the kept values of a sparse weight (a flat vector).
    Raises:
        ValueError: ``name`` is taken.
    """
    names = settings if callable(settings) else (lambda fixed=frozenset(settings): fixed)

    def deco(fn: Callable) -> Callable:
        if name in CODECS:
            raise ValueError(f"codec {name!r} is already registered")
        CODECS[name] = Codec(name, fn, lambda: None if (n := names()) is None else frozenset(n), sparse)
        return fn

    return deco


def get_codec(name: str) -> Codec:
    """The registered codec ``name``.

    Raises:
        ConfigError: key ``codec``, listing the registered names.
    """
    if name not in CODECS:
        msg = f"unknown codec {name!r}; registered codecs: {', '.join(sorted(CODECS))}"
        raise ConfigError(msg, [("codec", msg)])
    return CODECS[name]


@dataclass(frozen=True)
class Dense(StoredBits):
    """A weight stored uncompressed at ``values.dtype`` (float16 or float32)."""

    values: torch.Tensor  # the weight, cast to the storage dtype
    dtype: torch.dtype = torch.float32  # the dtype decompress() returns

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def total_bits(self) -> int:
        return self.values.numel() * self.values.element_size() * 8

    def decompress(self) -> torch.Tensor:
        return self.values.to(self.dtype)


def _keywords(fn: Callable) -> frozenset[str] | None:
    """Keyword-only parameter names of ``fn`` (the codecs' settings); None when it takes **kwargs."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def _defaults(fn: Callable) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> Dense:
    values = weight.detach().cpu().to(dtype).clone()
    if not bool(torch.isfinite(values).all()) and bool(torch.isfinite(weight).all()):
        raise ValueError(f"{dtype}: the weight overflows (|w| up to {float(weight.abs().max()):.3g})")
    return Dense(values, weight.dtype)


@register_codec("fp32")
def _fp32(weight: torch.Tensor) -> Dense:
    return _cast(weight, torch.float32)


@register_codec("fp16")
def _fp16(weight: torch.Tensor) -> Dense:
    return _cast(weight, torch.float16)


@register_codec("int8", settings=("group_size",))
def _int8(weight: torch.Tensor, group_size: int | None = None) -> rtn.RTNTensor:
    return rtn.compress(weight.detach().cpu(), bits=8, group_size=group_size)


@register_codec("int4", settings=("group_size",))
def _int4(weight: torch.Tensor, group_size: int | None = 32) -> rtn.RTNTensor:
    return rtn.compress(weight.detach().cpu(), bits=4, group_size=group_size)


@register_codec("seedlm", settings=lambda: _keywords(seedlm.compress))
def _seedlm(weight: torch.Tensor, **settings) -> seedlm.SeedLMTensor:
    return seedlm.compress(weight.detach().cpu(), **settings)


@register_codec("ternary", settings=("scale_dtype",))
def _ternary(weight: torch.Tensor, scale_dtype: str = "fp32") -> ternary.TernaryTensor:
    return ternary.compress(weight.detach().cpu(), scale_dtype=scale_dtype)


@register_codec("vptq", settings=lambda: _keywords(vptq.compress), sparse=False)
def _vptq(weight: torch.Tensor, **settings) -> vptq.VPTQTensor:
    if weight.dim() != 2:
        msg = (f"codec 'vptq' quantises 2-D weights only, got shape {tuple(weight.shape)}; "
               f"use one of {', '.join(sorted(n for n in CODECS if n != 'vptq'))} for this tensor")
        raise ConfigError(msg, [("codec", msg)])
    return vptq.compress(weight.detach().cpu(), **settings)


SPARSE_CODECS = tuple(sorted(n for n, c in CODECS.items() if c.sparse))


def _check_settings(codec: Codec, settings: dict, where: str) -> None:
    allowed = codec.settings()
    if allowed is None:  # the codec takes **kwargs: it checks its own settings
        return
    unknown = sorted(set(settings) - allowed)
    if unknown:
        msg = (f"{where}codec {codec.name!r} has no setting(s) {', '.join(map(repr, unknown))}; "
               f"allowed: {', '.join(sorted(allowed)) or 'none'}")
        raise ConfigError(msg, [("settings", msg)])


def planned_bits(shape: tuple[int, ...], codec: str, settings: dict | None = None) -> int | None:
    """Bits the codec will store for a weight of ``shape`` (equal to the result's ``total_bits``),
    computed without encoding; None for codecs whose size depends on more than the shape (VPTQ)."""
    settings = dict(settings or {})
    numel = math.prod(shape)
    if codec in ("fp32", "fp16"):
        return numel * (32 if codec == "fp32" else 16)
    if codec in ("int8", "int4"):
        bits = 8 if codec == "int8" else 4
        group = settings.get("group_size", None if codec == "int8" else 32)
        cols = shape[-1] if len(shape) else 1
        rows = numel // cols if cols else 0
        g = group or cols
        groups = -(-cols // g) if g else 0
        return rows * groups * (g * bits + 16 + bits)
    if codec == "seedlm":
        s = {"block": 8, "latent": 3, "seed_bits": 16} | _defaults(seedlm.compress) | settings
        return -(-numel // s["block"]) * (s["seed_bits"] + 4 + 4 * s["latent"])
    if codec == "ternary":
        return ternary.planned_bits(shape, scale_dtype=settings.get("scale_dtype", "fp32"))
    return None


def _sparse_inner_settings(codec: str, settings: dict, shape: tuple[int, ...], nnz: int) -> dict:
    """Settings of the inner codec on the flat kept values: int8 groups by the row length."""
    inner = dict(settings)
    if codec == "int8" and inner.get("group_size") is None and len(shape) > 1:
        inner["group_size"] = max(1, min(shape[-1], nnz))
    return inner


def sparse_worthwhile(weight: torch.Tensor, codec: str, settings: dict | None = None) -> bool:
    """Whether a keep-mask plus the nonzero values under ``codec`` takes fewer bits than ``codec``
    on the whole weight. Always False for dense-only codecs (VPTQ)."""
    settings = dict(settings or {})
    if not get_codec(codec).sparse:
        return False
    shape = tuple(weight.shape)
    nnz = int((weight != 0).sum())
    if codec == "ternary" and ternary.is_ternary(weight) and not ternary.is_ternary(weight, per_row=False):
        return False  # the kept values are one flat row with one scale: a per-row-scaled BitNet weight would lose its exactness
    dense = planned_bits(shape, codec, settings)
    inner = planned_bits((nnz,), codec, _sparse_inner_settings(codec, settings, shape, nnz)) if nnz else 0
    return dense is not None and inner is not None and math.prod(shape) + inner < dense


def encode(weight: torch.Tensor, codec: str, settings: dict | None = None, *, sparse: bool = False,
           name: str | None = None) -> Stored:
    """Store ``weight`` with the codec ``codec``.

    Args:
        weight: a floating-point tensor (any shape; VPTQ: 2-D).
        codec: a registered name (``CODECS``): fp32, fp16, int8, int4, seedlm, vptq, ternary.
        settings: the codec's settings (see the module docstring); None: its defaults.
        sparse: store the nonzero entries plus a 1-bit mask when that is smaller
            (:func:`sparse_worthwhile`); ignored for dense-only codecs (VPTQ).
        name: the parameter's name, used in error messages.
    Returns:
        A stored tensor (Dense, RTNTensor, SeedLMTensor, VPTQTensor, TernaryTensor or SparseTensor).
    Raises:
        ConfigError: an unknown codec or setting, or VPTQ on a weight that is not 2-D.
        TypeError: ``weight`` is not a floating-point tensor.
        ValueError: from the codec (e.g. non-finite weights).
    """
    where = f"parameter {name!r}: " if name else ""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"{where}codecs store floating-point tensors, got {got}")
    spec = get_codec(codec)
    settings = dict(settings or {})
    _check_settings(spec, settings, where)
    if sparse and sparse_worthwhile(weight, codec, settings):
        mask, kept = split(weight)
        if kept.numel():
            values = spec.fn(kept, **_sparse_inner_settings(codec, settings, tuple(weight.shape), kept.numel()))
        else:  # all pruned: nothing to code
            values = Dense(kept.to(torch.float16), weight.dtype)
        return SparseTensor(tuple(weight.shape), mask, values, weight.dtype)
    try:
        return spec.fn(weight, **settings)
    except ConfigError as exc:  # name the parameter
        if not where:
            raise
        raise ConfigError(where + str(exc), [(f"{name}.{k}", m) for k, m in exc.problems]) from exc
