"""Ternary weights: BitNet b1.58 (Ma et al., "The Era of 1-bit LLMs: All Large Language Models
are in 1.58 Bits", 2024) stored in about 1.6 bits per weight. Plain PyTorch.

A weight is read as rows (all dims but the last; a 0-D or 1-D weight is one row) and stored as
``W = s * T``: one scale ``s`` per row and a trit ``T`` in {-1, 0, +1} per weight.

- A row that is already ternary (its nonzero ``|w|`` all equal, as a BitNet layer's weights are
  after its absmean quantisation) keeps that value as ``s`` and ``sign(w)`` as ``T``: lossless, as
  long as ``s`` survives the scale's dtype (always for float32/float16/bfloat16 weights under the
  default float32 scales).
- Any other row is quantised as BitNet b1.58 does (absmean): ``s = mean(|w|)`` (at least 1e-8),
  ``T = clamp(round(w / s), -1, 1)``: lossy.

The trits of the whole weight, row-major, are packed five to a byte (3^5 = 243 <= 256): the byte
is ``sum(d_i * 3^(4 - i))`` over the base-3 digits ``d = T + 1`` in {0, 1, 2}, first trit most
significant; the last byte is padded with zero trits (digit 1). So a weight of ``n`` values in
``r`` rows takes ``ceil(n / 5) * 8 + r * b`` bits (``b`` = 32 for float32 scales, 16 for float16):
1.6 bits per weight for the codes, plus ``b / cols`` for the scales (0.1 bit at 320 columns and
float32 scales). :attr:`TernaryTensor.total_bits` counts all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from phases.compression.stored import StoredBits

__all__ = ["SCALE_DTYPES", "TRITS_PER_BYTE", "TernaryTensor", "check_packed", "compress", "is_ternary",
           "pack_trits", "planned_bits", "ternarize_linears", "ternary_share", "unpack_trits"]

TRITS_PER_BYTE = 5
SCALE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
_VALID_BYTES = 3**TRITS_PER_BYTE  # 243: bytes 243-255 are not a group of five trits
_POWERS = torch.tensor([3**(TRITS_PER_BYTE - 1 - i) for i in range(TRITS_PER_BYTE)], dtype=torch.int32)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a weight: rows are all dims but the last; 0-D and 1-D are one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def _scale_dtype(name: str) -> torch.dtype:
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {', '.join(map(repr, SCALE_DTYPES))}, got {name!r}")
    return SCALE_DTYPES[name]


# --- packing ---------------------------------------------------------------------------------

def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """Trits in {-1, 0, 1} (any shape, read row-major) as (ceil(n / 5),) uint8, five per byte.

    Raises:
        ValueError: a value outside {-1, 0, 1}.
    """
    flat = t.detach().reshape(-1).cpu().to(torch.int32)
    if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise ValueError(f"trits must be in {{-1, 0, 1}}, got values in [{int(flat.min())}, {int(flat.max())}]")
    pad = (-flat.numel()) % TRITS_PER_BYTE
    digits = torch.cat([flat + 1, torch.ones(pad, dtype=torch.int32)])  # padding: trit 0, digit 1
    return (digits.reshape(-1, TRITS_PER_BYTE) * _POWERS).sum(1).to(torch.uint8)  # (ceil(n / 5),)


def check_packed(packed: torch.Tensor, count: int) -> None:
    """Check that ``packed`` can hold ``count`` trits: 1-D uint8, ceil(count / 5) bytes, each < 243.

    Raises:
        ValueError: naming what is wrong.
    """
    need = -(-count // TRITS_PER_BYTE)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"{count} trits need {need} uint8 bytes (1-D), got {packed.numel()} {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    if need and int(packed.max()) >= _VALID_BYTES:
        raise ValueError(f"byte value {int(packed.max())} is not five trits (must be < {_VALID_BYTES})")


def unpack_trits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``count`` trits as an int8 tensor (count,).

    Raises:
        ValueError: see :func:`check_packed`.
    """
    check_packed(packed, count)
    digits = (packed.cpu().to(torch.int32)[:, None] // _POWERS) % 3  # (bytes, 5)
    return (digits.reshape(-1)[:count] - 1).to(torch.int8)


# --- the stored tensor -----------------------------------------------------------------------

@dataclass(frozen=True)
class TernaryTensor(StoredBits):
    shape: tuple[int, ...]
    codes: torch.Tensor  # (ceil(numel / 5),) uint8: the trits, row-major, five per byte
    scales: torch.Tensor  # (rows,) float32 or float16: one scale per row
    dtype: torch.dtype = torch.float32

    @property
    def scale_dtype(self) -> str:
        return next(k for k, v in SCALE_DTYPES.items() if v == self.scales.dtype)

    @property
    def total_bits(self) -> int:
        """The packed trit bytes (padding included) and every scale at its dtype's width."""
        return self.codes.numel() * 8 + self.scales.numel() * self.scales.element_size() * 8

    def trits(self) -> torch.Tensor:
        """The codes in {-1, 0, 1} as an int8 tensor of ``shape``."""
        return unpack_trits(self.codes, self.numel).reshape(self.shape)

    def decompress(self) -> torch.Tensor:
        t = self.trits().reshape(_rows_cols(self.shape))
        # float32 products of a trit and a float32 scale are exact: +-s or 0
        w = t.to(torch.float32) * self.scales.to(torch.float32)[:, None]
        return w.reshape(self.shape).to(self.dtype)


# --- detection and compression ---------------------------------------------------------------

def _exact_rows(a: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: rows of ``a`` = |w| (rows, cols), cols > 0, whose nonzero entries are all equal."""
    return ((a == 0) | (a == a.amax(1, keepdim=True))).all(1)


def is_ternary(weight: torch.Tensor, *, per_row: bool = True) -> bool:
    """Whether ``weight`` is ``s * T`` exactly: every row's (``per_row``; else the whole tensor's)
    nonzero absolute values are equal (exact float equality). An all-zero row counts as ternary,
    a tensor with NaN or infinite values does not."""
    if weight.numel() == 0:
        return True
    if not bool(torch.isfinite(weight).all()):
        return False
    a = weight.detach().abs()
    a = a.reshape(_rows_cols(tuple(weight.shape))) if per_row else a.reshape(1, -1)
    return bool(_exact_rows(a).all())


def planned_bits(shape: tuple[int, ...], *, scale_dtype: str = "fp32") -> int:
    """``total_bits`` of :func:`compress` on a weight of ``shape``, without compressing."""
    rows, _ = _rows_cols(tuple(shape))
    return -(-math.prod(shape) // TRITS_PER_BYTE) * 8 + rows * _scale_dtype(scale_dtype).itemsize * 8


def compress(weight: torch.Tensor, *, scale_dtype: str = "fp32") -> TernaryTensor:
    """Store ``weight`` as trits and one scale per row: exactly for rows that are already ternary,
    by BitNet b1.58's absmean quantisation otherwise (see the module docstring).

    Args:
        weight: a floating-point tensor of any shape.
        scale_dtype: "fp32" (default; ternary rows decompress bit for bit) or "fp16".
    Raises:
        TypeError: ``weight`` is not a floating-point tensor.
        ValueError: non-finite weights, an unknown ``scale_dtype``, or a scale that overflows it.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"ternary: expected a floating-point tensor, got {got}")
    store = _scale_dtype(scale_dtype)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("ternary: the weight has NaN or infinite values")
    shape = tuple(weight.shape)
    rows, cols = _rows_cols(shape)
    if cols == 0:  # nothing to code: zero-width rows
        return TernaryTensor(shape, pack_trits(torch.zeros(0)), torch.zeros(rows, dtype=store), weight.dtype)
    w = weight.detach().cpu().reshape(rows, cols)
    a = w.abs()
    exact = _exact_rows(a)  # (rows,), checked in the weight's own precision
    w, a = w.float(), a.float()
    absmean = a.mean(1).clamp_min(1e-8)  # (rows,)
    codes = torch.where(exact[:, None], torch.sign(w), torch.clamp(torch.round(w / absmean[:, None]), -1, 1))
    scales = torch.where(exact, a.amax(1), absmean).to(store)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"ternary: a row scale overflows {scale_dtype} (|w| up to {float(a.max()):.3g})")
    return TernaryTensor(shape, pack_trits(codes.to(torch.int8)), scales, weight.dtype)


def ternary_share(state: dict[str, torch.Tensor], *, min_weights: int = 256) -> float:
    """The fraction of ``state``'s weight matrices (2-D floating tensors of at least
    ``min_weights`` entries, the ones the codecs compress) that are ternary row by row: about
    all the linear layers of a BitNet (phase-4) model, whose embeddings stay in floating point;
    0.0 for an ordinary model."""
    mats = [t for t in state.values() if t.is_floating_point() and t.dim() == 2 and t.numel() >= min_weights]
    return sum(is_ternary(t) for t in mats) / len(mats) if mats else 0.0


@torch.no_grad()
def ternarize_linears(model: torch.nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Ternarise every ``nn.Linear`` weight of ``model`` in place as BitNet b1.58 does (absmean,
    one scale per row: ``s * clamp(round(w / s), -1, 1)``), except modules whose name contains
    one of ``skip``; embeddings stay floating point. A stand-in for a phase-4 (BitNet) model in
    tests and benchmarks (post-training, so it loses accuracy a quantisation-aware run would
    keep). Returns the names of the ternarised weights."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(k in name for k in skip):
            w = module.weight
            s = w.abs().mean(dim=1, keepdim=True).clamp_min(1e-8)
            w.copy_(torch.clamp(torch.round(w / s), -1, 1) * s)
            done.append(f"{name}.weight")
    return done
