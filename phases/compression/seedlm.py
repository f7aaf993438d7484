"""SeedLM (Shafipour et al., ICLR 2025): weight blocks stored as a pseudo-random generator seed
and a few quantized coefficients. Data-free; plain PyTorch/NumPy.

For a weight tensor flattened row-major into blocks ``w`` of ``C`` values (``block``):

1. every nonzero ``K``-bit state ``s`` (``seed_bits``) of a maximal-length Fibonacci LFSR seeds
   ``C x P`` successive LFSR states, row-wise, normalised to ``U(s) = (V - 2^(K-1)) / (2^(K-1) - 1)``
   in [-1, 1] (``P`` = ``latent``);
2. ``t = pinv(U(s)) w`` (least squares, float64 pseudo-inverses: some ``U(s)`` are
   ill-conditioned), quantised to ``P`` 4-bit two's-complement mantissas ``q`` in [-8, 7] with one
   shared 4-bit exponent ``e`` in [-8, 7]: ``t^ = q 2^e``, ``e = ceil(log2(max|t| / 7.5))``
   (the literal ``max floor(log2|t_i|)`` rule wastes most exponent codes; see the notes);
3. the seed whose ``U(s) t^`` is closest to ``w`` is kept: ``K + 4 + 4P`` bits per block.

Bits per weight are exactly ``(K + 4 + 4P) / C`` (4.0 at the paper's (C, P, K) = (8, 3, 16));
a tensor whose size is not a multiple of ``C`` is padded with zeros and the padding's bits are
counted. :meth:`SeedLMTensor.to_bytes` packs the fields into exactly that many bits (rounded up
to a byte), and :func:`from_bytes` reads them back.

Hand-written: no maintained library implements SeedLM (the paper released no code).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from phases.compression.stored import StoredBits

__all__ = ["SeedLMTensor", "compress", "from_bytes", "lfsr_states", "TAPS"]

# Feedback taps (bit positions XORed into the new top bit of a right-shifting Fibonacci LFSR) of
# maximal-length registers, by width; 16 bits: x^16 + x^14 + x^13 + x^11 + 1. Every period is
# 2^K - 1 (tests/phases/test_compression_codecs.py checks it).
TAPS: dict[int, tuple[int, ...]] = {8: (0, 2, 3, 4), 10: (0, 3), 12: (0, 1, 2, 8), 14: (0, 1, 2, 12), 16: (0, 2, 3, 5)}
_MANT_BITS, _EXP_BITS = 4, 4
_Q_MIN, _Q_MAX, _E_MIN, _E_MAX = -8, 7, -8, 7


def lfsr_states(seeds: np.ndarray, count: int, bits: int) -> np.ndarray:
    """``count`` successive states of a ``bits``-wide Fibonacci LFSR from each seed (the seed is
    not among them): shape (len(seeds), count), values in [1, 2^bits - 1].

    Raises:
        ValueError: no tap table for ``bits``.
    """
    if bits not in TAPS:
        raise ValueError(f"no maximal-length LFSR taps for {bits}-bit seeds; choose from {sorted(TAPS)}")
    state = seeds.astype(np.uint32).copy()
    out = np.empty((len(seeds), count), dtype=np.uint32)
    for i in range(count):
        fb = np.zeros_like(state)
        for t in TAPS[bits]:
            fb ^= (state >> t) & 1
        state = (state >> 1) | (fb << (bits - 1))
        out[:, i] = state
    return out


@functools.lru_cache(maxsize=4)
def _bases(block: int, latent: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U(s) for every nonzero seed (S, C, P) and their pseudo-inverses (S, P, C), float64."""
    seeds = np.arange(1, 2**bits, dtype=np.uint32)
    v = lfsr_states(seeds, block * latent, bits).astype(np.float64).reshape(len(seeds), block, latent)
    half = 2.0 ** (bits - 1)
    u = torch.from_numpy((v - half) / (half - 1.0))
    return u, torch.linalg.pinv(u)


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-exponent 4-bit quantisation of the last dim: (mantissas int, exponents int)."""
    peak = t.abs().amax(dim=-1).clamp_min(1e-30)
    e = torch.ceil(torch.log2(peak / 7.5)).clamp(_E_MIN, _E_MAX)
    q = torch.round(t / torch.exp2(e)[..., None]).clamp(_Q_MIN, _Q_MAX)
    return q, e


@dataclass(frozen=True)
class SeedLMTensor(StoredBits):
    """A SeedLM-compressed tensor: per block a seed, an exponent and ``latent`` mantissas."""

    shape: tuple[int, ...]
    block: int
    latent: int
    seed_bits: int
    seeds: torch.Tensor  # (n_blocks,) int64, in [1, 2^K - 1]
    exponents: torch.Tensor  # (n_blocks,) int8, in [-8, 7]
    mantissas: torch.Tensor  # (n_blocks, latent) int8, in [-8, 7]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_block(self) -> int:
        return self.seed_bits + _EXP_BITS + _MANT_BITS * self.latent

    @property
    def total_bits(self) -> int:
        """Every stored bit (padding blocks included)."""
        return len(self.seeds) * self.bits_per_block



    def decompress(self) -> torch.Tensor:
        u, _ = _bases(self.block, self.latent, self.seed_bits)
        t = self.mantissas.double() * torch.exp2(self.exponents.double())[:, None]
        w = torch.einsum("bcp,bp->bc", u[self.seeds - 1], t).reshape(-1)[: self.numel]
        return w.reshape(self.shape).to(self.dtype)

    def to_bytes(self) -> bytes:
        """The fields bit-packed, block after block: seed (K bits), exponent (4, two's
        complement), mantissas (4 each, two's complement); ``nbytes`` long."""
        fields = [(self.seeds.numpy().astype(np.uint64), self.seed_bits),
                  ((self.exponents.numpy().astype(np.int64) & 0xF).astype(np.uint64), _EXP_BITS)]
        fields += [((self.mantissas[:, i].numpy().astype(np.int64) & 0xF).astype(np.uint64), _MANT_BITS)
                   for i in range(self.latent)]
        return _pack(fields, len(self.seeds))


def _pack(fields: list[tuple[np.ndarray, int]], n: int) -> bytes:
    width = sum(b for _, b in fields)
    bits = np.zeros((n, width), dtype=np.uint8)
    col = 0
    for values, b in fields:
        for k in range(b):  # most significant bit first
            bits[:, col + k] = (values >> np.uint64(b - 1 - k)) & np.uint64(1)
        col += b
    return np.packbits(bits.reshape(-1)).tobytes()


def from_bytes(data: bytes, shape: tuple[int, ...], *, block: int = 8, latent: int = 3, seed_bits: int = 16,
               dtype: torch.dtype = torch.float32) -> SeedLMTensor:
    """Read :meth:`SeedLMTensor.to_bytes` back.

    Raises:
        ValueError: ``data`` is not the size the shape and settings imply.
    """
    n_blocks = -(-math.prod(shape) // block)
    width = seed_bits + _EXP_BITS + _MANT_BITS * latent
    if len(data) != (n_blocks * width + 7) // 8:
        raise ValueError(f"SeedLM data has {len(data)} bytes; shape {shape} at (C, P, K) = "
                         f"({block}, {latent}, {seed_bits}) needs {(n_blocks * width + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n_blocks * width].reshape(n_blocks, width)

    def field(start: int, b: int) -> np.ndarray:
        weights = (1 << np.arange(b - 1, -1, -1)).astype(np.int64)
        return bits[:, start:start + b].astype(np.int64) @ weights

    def signed4(v: np.ndarray) -> np.ndarray:
        return np.where(v >= 8, v - 16, v)

    seeds = field(0, seed_bits)
    if (seeds == 0).any():
        raise ValueError("SeedLM data holds a zero seed (the LFSR's dead state): corrupt data")
    exps = signed4(field(seed_bits, _EXP_BITS))
    mants = np.stack([signed4(field(seed_bits + _EXP_BITS + _MANT_BITS * i, _MANT_BITS)) for i in range(latent)], 1)
    return SeedLMTensor(tuple(shape), block, latent, seed_bits, torch.from_numpy(seeds),
                        torch.from_numpy(exps.astype(np.int8)), torch.from_numpy(mants.astype(np.int8)), dtype)


def compress(weight: torch.Tensor, *, block: int = 8, latent: int = 3, seed_bits: int = 16,
             chunk: int = 32) -> SeedLMTensor:
    """Compress ``weight`` (any shape, flattened row-major) with an exhaustive seed search.

    Args:
        block: ``C``, weights per block.
        latent: ``P``, coefficients per block.
        seed_bits: ``K``, LFSR width (2^K - 1 seeds are searched).
        chunk: blocks searched at once (memory: chunk x 2^K x C doubles).

    Raises:
        ValueError: bad settings or a tensor with non-finite values.
    """
    if block < 1 or latent < 1 or latent > block:
        raise ValueError(f"need 1 <= latent <= block, got block={block}, latent={latent}")
    if not torch.isfinite(weight).all():
        raise ValueError("SeedLM: the weight has NaN or infinite values")
    u, u_pinv = _bases(block, latent, seed_bits)
    flat = weight.detach().reshape(-1).double().cpu()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    seeds, exps, mants = [], [], []
    for start in range(0, len(blocks), chunk):
        w = blocks[start:start + chunk]  # (B, C)
        t = torch.einsum("spc,bc->bsp", u_pinv, w)  # (B, S, P)
        q, e = _quantize(t)
        recon = torch.einsum("scp,bsp->bsc", u, q * torch.exp2(e)[..., None])  # (B, S, C)
        err = ((recon - w[:, None, :]) ** 2).sum(-1)  # (B, S)
        best = err.argmin(dim=1)
        rows = torch.arange(len(w))
        seeds.append(best + 1)
        exps.append(e[rows, best].to(torch.int8))
        mants.append(q[rows, best].to(torch.int8))
    return SeedLMTensor(tuple(weight.shape), block, latent, seed_bits, torch.cat(seeds).long(), torch.cat(exps),
                        torch.cat(mants), weight.dtype)
