"""What every compressed tensor reports: bits per weight and bytes, from its ``total_bits``."""

from __future__ import annotations

__all__ = ["StoredBits"]


class StoredBits:
    """Mixin for the codecs' results: ``total_bits`` (every stored bit: codes, codebooks,
    scales, seeds, padding) and ``numel`` (weights represented) give the rest."""

    total_bits: int
    numel: int

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.numel

    @property
    def nbytes(self) -> int:
        """Bytes when the bits are packed (rounded up to a whole byte)."""
        return (self.total_bits + 7) // 8
