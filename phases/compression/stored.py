"""What every compressed tensor reports: bits per weight and bytes, from its ``total_bits``."""

from __future__ import annotations

import math

__all__ = ["StoredBits"]


class StoredBits:
    """Mixin for the codecs' results: ``total_bits`` (every stored bit: codes, codebooks,
    scales, seeds, padding) and ``shape`` (so ``numel``, the weights represented) give the rest."""

    total_bits: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Weights represented: the product of ``shape``."""
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.numel

    @property
    def nbytes(self) -> int:
        """Bytes when the bits are packed (rounded up to a whole byte)."""
        return (self.total_bits + 7) // 8
