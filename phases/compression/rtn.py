"""Round-to-nearest (RTN) integer quantisation with per-group scales: the baseline every other
codec is compared with, and the int8 format. Plain PyTorch.

Asymmetric min-max per group of ``group_size`` consecutive weights along each row (input dim):
``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``,
with the range widened to include 0 as GPTQ's quantiser does (so ``z`` fits in ``b`` bits); the
scale (float16) and zero point (``b`` bits) are counted in :attr:`bits_per_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phases.compression.stored import StoredBits

__all__ = ["RTNTensor", "compress"]


@dataclass(frozen=True)
class RTNTensor(StoredBits):
    shape: tuple[int, ...]
    bits: int
    group_size: int
    codes: torch.Tensor  # (rows, groups, group_size) uint8
    scales: torch.Tensor  # (rows, groups) float16
    zeros: torch.Tensor  # (rows, groups) uint8
    dtype: torch.dtype = torch.float32

    @property
    def total_bits(self) -> int:
        """Codes (padding included), one float16 scale and one ``bits``-bit zero per group."""
        return self.codes.numel() * self.bits + self.scales.numel() * (16 + self.bits)



    def decompress(self) -> torch.Tensor:
        w = (self.codes.float() - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        cols = self.shape[-1] if len(self.shape) > 1 else self.numel
        return w.reshape(w.shape[0], -1)[:, :cols].reshape(self.shape).to(self.dtype)


def compress(weight: torch.Tensor, *, bits: int = 8, group_size: int | None = None) -> RTNTensor:
    """Quantise ``weight`` (rows = all but the last dim) to ``bits`` bits per weight plus one
    scale and zero point per group of ``group_size`` along the last dim (None: the whole row).

    Raises:
        ValueError: ``bits`` outside 1-8, a bad group size, or non-finite weights.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    if not torch.isfinite(weight).all():
        raise ValueError("RTN: the weight has NaN or infinite values")
    w = weight.detach().float().reshape(-1, weight.shape[-1] if weight.dim() else 1)
    g = group_size or w.shape[1]
    if g < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    pad = (-w.shape[1]) % g
    w = torch.nn.functional.pad(w, (0, pad))
    # pad with each row's first value, so padding never widens a group's range
    if pad:
        w[:, -pad:] = w[:, :1]
    grouped = w.reshape(w.shape[0], -1, g)
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, levels)
    codes = torch.clamp(torch.round(grouped / scale[..., None]) + zero[..., None], 0, levels)
    return RTNTensor(tuple(weight.shape), bits, g, codes.to(torch.uint8), scale.half(), zero.to(torch.uint8),
                     weight.dtype)
