"""Sparse storage of a pruned weight: a 1-bit keep-mask plus the kept values, which are
themselves stored by any dense codec (fp16, int8, int4, SeedLM, ...). Plain PyTorch/NumPy.

Magnitude or structured pruning (``phases.compression.pruning``) leaves exact zeros; at 60%
sparsity a mask of 1 bit per weight plus the 40% kept values costs less than coding every
weight. :class:`SparseTensor` counts both in :attr:`total_bits`; :meth:`decompress` scatters
the decoded values back into a zero tensor, so pruned weights stay exactly zero whatever the
inner codec does to the kept ones. The kept values are the nonzero weights in row-major order
(a flat 1-D tensor), which is what the inner codec sees.

Choosing between sparse and dense storage (and the inner codec) is ``codecs.encode``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phases.compression.stored import StoredBits

__all__ = ["SparseTensor", "split", "pack_mask", "unpack_mask"]


@dataclass(frozen=True)
class SparseTensor(StoredBits):
    """A keep-mask (1 bit per weight, counted) and the kept values under an inner codec."""

    shape: tuple[int, ...]
    mask: torch.Tensor  # (numel,) bool: True where the weight was kept (nonzero)
    values: Any  # a stored tensor (Dense, RTNTensor, SeedLMTensor, ...) of shape (mask.sum(),)
    dtype: torch.dtype = torch.float32

    @property
    def nnz(self) -> int:
        """Kept (nonzero) weights."""
        return int(self.mask.sum())

    @property
    def total_bits(self) -> int:
        """One mask bit per weight plus every bit of the inner codec."""
        return self.numel + self.values.total_bits

    def decompress(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.dtype)
        if self.nnz:
            out[self.mask] = self.values.decompress().reshape(-1).to(self.dtype)
        return out.reshape(self.shape)


def split(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep-mask (numel,) bool of the nonzero entries and the kept values (nnz,), row-major."""
    flat = weight.detach().reshape(-1).cpu()
    mask = flat != 0
    return mask, flat[mask]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (n,) as (ceil(n / 8),) uint8, most significant bit first."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the first ``n`` bits as a bool tensor (n,).

    Raises:
        ValueError: ``packed`` is not ``ceil(n / 8)`` bytes.
    """
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"a mask of {n} bits needs {(n + 7) // 8} uint8 bytes, got {packed.numel()} "
                         f"{packed.dtype}")
    bits = np.unpackbits(packed.reshape(-1).numpy())[:n]
    return torch.from_numpy(bits.astype(bool))
