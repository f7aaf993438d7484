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

The search is exact but not brute force (see :func:`compress`): a float32 least-squares screen
bounds every seed's error from below and only the few seeds that can still win are quantised:
about 170x faster than quantising all 65,535 seeds of every block on Gaussian weights at
(8, 3, 16), 20x on blocks so small that quantisation dominates (``benchmarks/seedlm_speed.py``).

Bits per weight are exactly ``(K + 4 + 4P) / C`` (4.0 at the paper's (C, P, K) = (8, 3, 16));
a tensor whose size is not a multiple of ``C`` is padded with zeros and the padding's bits are
counted. :meth:`SeedLMTensor.to_bytes` packs the fields into exactly that many bits (rounded up
to a byte), and :func:`from_bytes` reads them back.

Hand-written: no maintained library implements SeedLM (the paper released no code).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from coordinator.errors import AgentForgeError
from phases.compression.stored import StoredBits

__all__ = ["TAPS", "SeedLMTensor", "SeedLMTooSlow", "compress", "from_bytes", "lfsr_states"]

# Feedback taps (bit positions XORed into the new top bit of a right-shifting Fibonacci LFSR) of
# maximal-length registers, by width; 16 bits: x^16 + x^14 + x^13 + x^11 + 1. Every period is
# 2^K - 1 (tests/phases/test_compression_codecs.py checks it).
TAPS: dict[int, tuple[int, ...]] = {8: (0, 2, 3, 4), 10: (0, 3), 12: (0, 1, 2, 8), 14: (0, 1, 2, 12), 16: (0, 2, 3, 5)}
_MANT_BITS, _EXP_BITS = 4, 4
_Q_MIN, _Q_MAX, _E_MIN, _E_MAX = -8, 7, -8, 7
_GROUP = 16  # seeds per group of the screen (a group is searched when its best fit may win)


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


class SeedLMTooSlow(AgentForgeError, TimeoutError):
    """:func:`compress` projected, after its first chunk of blocks, a run longer than its
    ``max_seconds``; the caller falls back to another codec (phase 8: int8)."""

    def __init__(self, shape: tuple[int, ...], projected_s: float, allowed_s: float):
        super().__init__(f"SeedLM on a tensor of shape {tuple(shape)} would take about {projected_s:.3g} s "
                         f"(projected after the first chunk of blocks); allowed {allowed_s:.3g} s")
        self.shape, self.projected_s, self.allowed_s = tuple(shape), projected_s, allowed_s

    def __reduce__(self):  # Ray pickles exceptions across processes; rebuild from the fields
        return (type(self), (self.shape, self.projected_s, self.allowed_s))


@functools.lru_cache(maxsize=4)
def _screen(block: int, latent: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The screen of every seed: ``||Q(s)^T x||^2`` for a unit block ``x``, ``Q(s)`` (C, P) an
    orthonormal basis of a space that holds ``U(s)``'s columns, as a linear form in the products
    ``x_c x_c'`` (c <= c'). Returns the products' index pairs (two (F,) long tensors), the form's
    coefficients (S', F) float32 (S' = S rounded up to a multiple of ``_GROUP``^2, the extra rows
    zero), and the margin that bounds the float32 form's rounding error."""
    u, _ = _bases(block, latent, bits)
    q = torch.linalg.svd(u, full_matrices=False).U  # (S, C, P), orthonormal even where U(s) is singular
    proj = q @ q.transpose(1, 2)  # (S, C, C): the orthogonal projectors
    i, j = torch.triu_indices(block, block)
    coef = proj[:, i, j] * torch.where(i == j, 1.0, 2.0).double()
    coef = torch.cat([coef, coef.new_zeros((-len(coef)) % _GROUP**2, len(i))]).float().contiguous()
    # |computed - exact| of the float32 form at a unit x: the F-term sum and the roundings of x,
    # of the products and of the coefficients stay within (F + 4) u sum_cc' |x_c x_c' P_cc'|
    # <= (F + 4) u C (u = 2^-24, |P_cc'| <= 1, (sum_c |x_c|)^2 <= C); the margin is 8 times that.
    margin = 8.0 * (len(i) + 4) * block * 2.0**-24
    return i, j, coef, margin


@functools.lru_cache(maxsize=4)
def _quant_screen(block: int, latent: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the second, tighter lower bound needs per seed: ``pinv(U(s))`` (S P, C) float32,
    ``0.999 sigma_min(U(s))^2`` (S,) (0 where U(s) is numerically singular) and ``delta`` (S,),
    a bound on the float32 error of ``pinv(U(s)) x`` at a unit ``x`` (the float64 ``pinv``'s own
    error included)."""
    u, u_pinv = _bases(block, latent, bits)
    sv = torch.linalg.svdvals(u)
    lam = torch.where(sv[:, -1] > 1e-8 * sv[:, 0], 0.999 * sv[:, -1] ** 2, 0.0)
    rows = u_pinv.norm(dim=2).amax(dim=1)
    delta = rows * (8.0 * (block + 4) * 2.0**-24 + 1e-12 * sv[:, 0] / sv[:, -1].clamp_min(1e-300))
    return u_pinv.reshape(-1, block).float().contiguous(), lam.float(), delta.float()


@functools.lru_cache(maxsize=4)
def _table(block: int, latent: int, bits: int) -> torch.Tensor:
    """Per seed, one row (S, 2 C P) float64: ``pinv(U(s))`` as (C, P), then ``U(s)`` as (P, C)
    (gathered by one index_select per batch of (block, seed) pairs)."""
    u, u_pinv = _bases(block, latent, bits)
    return torch.cat([u_pinv.transpose(1, 2).reshape(len(u), -1), u.transpose(1, 2).reshape(len(u), -1)], 1).contiguous()


def _errors(w: torch.Tensor, rows: torch.Tensor, latent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction error ``||w - U(s) q 2^e||^2`` (N,) of each block of ``w`` (N, C) float64
    with its own seed's :func:`_table` row (N, 2 C P), and its ``q`` (N, P), ``e`` (N,): the
    float64 criterion of the exhaustive search, quantiser :func:`_quantize`.

    Every sum runs in a fixed order, one elementwise operation at a time, so a pair's error does
    not depend on which other pairs share the call (batch size, chunking, threads)."""
    c_n, p_n = w.shape[1], latent
    t = rows[:, 0:p_n] * w[:, 0:1]
    for c in range(1, c_n):
        t = t + rows[:, c * p_n:(c + 1) * p_n] * w[:, c:c + 1]
    q, e = _quantize(t)
    dq = q * torch.exp2(e)[:, None]
    at = c_n * p_n
    recon = rows[:, at:at + c_n] * dq[:, 0:1]
    for p in range(1, p_n):
        recon = recon + rows[:, at + p * c_n:at + (p + 1) * c_n] * dq[:, p:p + 1]
    d = recon - w
    d = d * d
    err = d[:, 0]
    for c in range(1, c_n):
        err = err + d[:, c]
    return err, q, e


_PAIRS = 1 << 15  # (block, seed) pairs evaluated exactly at once (tens of MB)
_TIE = 1e-14  # errors within _TIE ||w||^2 are equal (rounding, not fit): the lowest seed of them wins
_TILE = 2048  # seeds screened per matrix product (cache-sized: _TILE x chunk float32)
_TOP = 8  # well-fitting seeds whose exact errors bound a block's best error from above
_WIDE, _TOP_WIDE = 512, 512  # a block with more candidate groups than _WIDE is bounded again
_WIDE_ROWS = 16  # such blocks bounded at once (memory: _WIDE_ROWS x 2^K x P x 4 bytes, a few times)


def compress(weight: torch.Tensor, *, block: int = 8, latent: int = 3, seed_bits: int = 16,
             chunk: int = 256, max_seconds: float | None = None) -> SeedLMTensor:
    """Compress ``weight`` (any shape, flattened row-major) with an exact search over every seed.

    Each block keeps the seed with the lowest float64 error ``||w - U(s) q 2^e||^2`` of all
    2^K - 1, the lowest seed on equal errors (equal within ``1e-14 ||w||^2``, float64 rounding):
    the exhaustive search's answer, found without quantising every seed. No quantised ``t^`` fits
    better than least squares, so ``||w||^2 - ||Q(s)^T w||^2`` (``Q(s)`` an orthonormal basis of
    ``U(s)``'s columns) bounds seed ``s``'s error from below. One float32 matrix product per
    chunk gives that bound for every seed, less a margin larger than its rounding error; the
    exact errors of a few well-fitting seeds bound the block's best error from above; only the
    seeds whose lower bound does not pass it are quantised and compared, in float64 (a handful
    per block on Gaussian weights). Blocks small enough that quantisation dominates their error
    get a tighter lower bound (the distance of ``t`` to the quantisation grid) and a tighter
    upper bound; zero blocks take seed 1; blocks with norms beyond 1e+-100 compare every seed.
    The float64 errors are summed in a fixed order: the result does not depend on ``chunk``
    or the number of threads.

    Args:
        block: ``C``, weights per block.
        latent: ``P``, coefficients per block.
        seed_bits: ``K``, LFSR width (2^K - 1 seeds are searched).
        chunk: blocks searched at once (memory: about chunk x 2^K / 4 bytes, plus tens of MB).
        max_seconds: time budget: after the first chunk the whole run's time is projected and,
            past the budget, :class:`SeedLMTooSlow` is raised instead of doing the rest (a
            single-chunk run has nothing left to save and returns).

    Raises:
        ValueError: bad settings or a tensor with non-finite values.
        SeedLMTooSlow: the projected time passes ``max_seconds``.
    """
    if block < 1 or latent < 1 or latent > block:
        raise ValueError(f"need 1 <= latent <= block, got block={block}, latent={latent}")
    if chunk < 1:
        raise ValueError(f"need chunk >= 1, got {chunk}")
    if not torch.isfinite(weight).all():
        raise ValueError("SeedLM: the weight has NaN or infinite values")
    began = time.perf_counter()
    tab = _table(block, latent, seed_bits)
    screen = _screen(block, latent, seed_bits) + _quant_screen(block, latent, seed_bits)
    flat = weight.detach().reshape(-1).double().cpu()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    n_blocks = len(blocks)
    seeds = torch.empty(n_blocks, dtype=torch.long)
    exps = torch.empty(n_blocks, dtype=torch.int8)
    mants = torch.empty(n_blocks, latent, dtype=torch.int8)
    setup_s = time.perf_counter() - began
    n_chunks = -(-n_blocks // chunk)
    for k, start in enumerate(range(0, n_blocks, chunk)):
        end = min(start + chunk, n_blocks)
        seeds[start:end], exps[start:end], mants[start:end] = _search(blocks[start:end], tab, latent, *screen)
        if k == 0 and max_seconds is not None and n_chunks > 1:
            projected = setup_s + (time.perf_counter() - began - setup_s) * n_chunks
            if projected > max_seconds:
                raise SeedLMTooSlow(tuple(weight.shape), projected, max_seconds)
    return SeedLMTensor(tuple(weight.shape), block, latent, seed_bits, seeds, exps, mants, weight.dtype)


def _lower_bound(fit: torch.Tensor, t: torch.Tensor, lam: torch.Tensor, delta: torch.Tensor,
                 step: torch.Tensor) -> torch.Tensor:
    """A lower bound (S, R) of every seed's error over ``||w||^2`` for R unit blocks ``x``, from
    their screen ``fit`` (S, R), ``t = pinv(U(s)) x`` (S P, R) and :func:`_quant_screen`'s ``lam``
    and ``delta``; ``step`` (R,) is the finest quantisation step, ``2^-8 / ||w||``, in ``x``'s units.

    ``||x - U q^||^2 = ||x - U t||^2 + ||U (t - q^)||^2 >= (1 - fit) + lam ||t - q^||^2`` and every
    coefficient ``q^_i`` lies on the grid ``step Z`` (the exponent is at least -8), so
    ``|t_i - q^_i|`` is at least ``t_i``'s distance to that grid, less ``delta`` for rounding."""
    t = t.view(len(fit), -1, fit.shape[1])
    gap = torch.div(t, step).round_().mul_(step).sub_(t).abs_().sub_(delta[:, None, None]).clamp_(min=0.0)
    return gap.mul_(gap).sum(dim=1).mul_(lam[:, None] * (1.0 - 1e-4)).sub_(fit).add_(1.0)


def _children(parent: torch.Tensor) -> torch.Tensor:
    """The ``_GROUP`` members of each supergroup or group in ``parent`` (..., k): (..., k _GROUP)."""
    return (parent[..., None] * _GROUP + torch.arange(_GROUP)).flatten(-2)


def _search(w: torch.Tensor, tab: torch.Tensor, latent: int, iu: torch.Tensor, ju: torch.Tensor,
            coef: torch.Tensor, margin: float, pinv32: torch.Tensor, lam: torch.Tensor,
            delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best seed of every block of ``w`` (B, C) float64: (seeds, exponents, mantissas)."""
    n, n_seeds = len(w), len(tab)
    norm = torch.linalg.vector_norm(w, dim=1)
    zero = (w == 0).all(dim=1)  # every seed reconstructs it exactly: the first seed wins the tie
    plain = (norm > 1e-100) & (norm < 1e100)  # screened; other nonzero blocks search every seed
    x = torch.where(plain[:, None], w / norm[:, None], 0.0).float()  # unit blocks
    feats = x[:, iu] * x[:, ju]  # (B, F)
    feats_t = feats.T.contiguous()
    # the screen, one cache-sized tile of seeds at a time, keeping the best fit of each group of
    # _GROUP seeds and of each supergroup of _GROUP groups
    group_max = torch.empty(len(coef) // _GROUP, n)
    tile = torch.empty(min(_TILE, len(coef)), n)
    for a in range(0, len(coef), _TILE):
        out = tile[:min(_TILE, len(coef) - a)]
        torch.mm(coef[a:a + _TILE], feats_t, out=out)
        torch.amax(out.view(-1, _GROUP, n), dim=1, out=group_max[a // _GROUP:(a + len(out)) // _GROUP])
    del tile
    super_max = group_max.view(-1, _GROUP, n).amax(dim=1)
    rows = torch.arange(n)

    def needed(at: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The least fit a seed needs to tie or beat the best of ``seeds`` (R, k) for the blocks
        ``at`` (R,): float32, the margin taken off; +inf (none) for blocks left out of the
        screen."""
        err = _errors(w.index_select(0, at.repeat_interleave(seeds.shape[1])),
                      tab.index_select(0, seeds.reshape(-1)), latent)[0]
        bound = err.view(seeds.shape).amin(dim=1)
        need = (1.0 - bound / norm[at] / norm[at] - _TIE - margin).float()
        return torch.where(plain[at], need, math.inf)

    def fits(sid: torch.Tensor, blk: torch.Tensor) -> torch.Tensor:
        """The screen's fit of each (seed, block) pair, float32."""
        return torch.cat([(coef.index_select(0, sid[a:a + _PAIRS]) * feats.index_select(0, blk[a:a + _PAIRS])).sum(dim=1)
                          for a in range(0, len(sid), _PAIRS)] or [feats.new_empty(0)])

    def descend(parent: torch.Tensor, blk: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members of the (super)groups ``parent`` of the blocks ``blk`` whose best fit
        ``best`` (their own (M', B) table) reaches the blocks' need."""
        child = _children(parent)
        blk = blk.repeat_interleave(_GROUP)
        keep = (best.view(-1).take(child * n + blk) >= need[blk]).nonzero()[:, 0]
        return child[keep], blk[keep]

    # upper bound: the exact errors of _TOP well-fitting seeds, found by descending from the best
    # supergroups to their best groups and those groups' best seeds
    sup = super_max.topk(min(_TOP, len(super_max)), dim=0, sorted=False).indices.T  # (B, k)
    grp = _children(sup)
    grp = grp.gather(1, group_max.view(-1).take(grp * n + rows[:, None]).topk(_TOP, dim=1, sorted=False).indices)
    fit = coef.view(-1, _GROUP, coef.shape[1]).index_select(0, grp.view(-1)).view(n, -1, coef.shape[1])
    fit = (fit * feats[:, None, :]).sum(dim=2)  # (B, _TOP _GROUP): the fits of those groups' seeds
    best = _children(grp).gather(1, fit.topk(_TOP, dim=1, sorted=False).indices)
    need = needed(rows, best.clamp(max=n_seeds - 1))  # (padding seeds fit worst: never best)
    # candidates: every seed whose lower bound does not pass it, found the same way down
    sup, blk = (super_max >= need[None, :]).nonzero(as_tuple=True)
    grp, blk = descend(sup, blk, group_max)
    wide = ((torch.bincount(blk, minlength=n) > _WIDE) & plain).nonzero()[:, 0]
    parts = []
    if len(wide):  # a loose bound (small blocks, whose quantisation error dominates): these
        # blocks get a tighter lower bound for every seed, and are bounded again from its best
        keep = (~torch.isin(blk, wide)).nonzero()[:, 0]
        grp, blk = grp[keep], blk[keep]
        x_t = x.T.contiguous()
        for a in range(0, len(wide), _WIDE_ROWS):
            r = wide[a:a + _WIDE_ROWS]
            low = _lower_bound(coef[:n_seeds] @ feats_t[:, r], pinv32 @ x_t[:, r], lam, delta,
                               (2.0**_E_MIN / norm[r]).clamp(1e-30, 1e30).float())  # (S, R)
            best = low.topk(min(_TOP_WIDE, n_seeds), dim=0, largest=False, sorted=False).indices.T
            need[r] = torch.maximum(need[r], needed(r, best))  # the tighter of the two bounds
            sid, at = (low <= 1.0 - need[r]).nonzero(as_tuple=True)
            parts.append((sid, r[at]))
    del group_max, super_max
    sid, blk = _children(grp), blk.repeat_interleave(_GROUP)
    keep = (sid < n_seeds).nonzero()[:, 0]
    sid, blk = sid[keep], blk[keep]
    keep = (fits(sid, blk) >= need[blk]).nonzero()[:, 0]
    parts.append((sid[keep], blk[keep]))
    parts.append((torch.zeros(int(zero.sum()), dtype=torch.long), zero.nonzero()[:, 0]))
    sid, blk = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    best = _pick(w, norm, tab, latent, sid, blk)
    for b in (~plain & ~zero).nonzero()[:, 0]:  # unscreened blocks (norm past 1e+-100): every seed
        best[b] = _pick(w[b:b + 1], norm[b:b + 1], tab, latent, torch.arange(n_seeds), torch.zeros(n_seeds, dtype=torch.long))
    if (best >= n_seeds).any():  # the seeds that set each bound always pass it
        raise RuntimeError("SeedLM: the seed search lost every candidate of a block (a bug)")
    _, q, e = _errors(w, tab.index_select(0, best), latent)
    return best + 1, e.to(torch.int8), q.to(torch.int8)


def _pick(w: torch.Tensor, norm: torch.Tensor, tab: torch.Tensor, latent: int, sid: torch.Tensor,
          blk: torch.Tensor) -> torch.Tensor:
    """Per block of ``w`` (B, C), the best of its candidate seeds (the pairs ``sid``, ``blk``):
    the lowest seed whose exact error is within ``_TIE ||w||^2`` of the least (B,); blocks
    without candidates get an out-of-range seed."""
    err = torch.cat([_errors(w.index_select(0, blk[a:a + _PAIRS]), tab.index_select(0, sid[a:a + _PAIRS]), latent)[0]
                     for a in range(0, len(blk), _PAIRS)] or [w.new_empty(0)])
    low = torch.full((len(w),), math.inf, dtype=torch.float64).scatter_reduce(0, blk, err, "amin")
    tied = (err <= low[blk] + _TIE * norm[blk] * norm[blk]).nonzero()[:, 0]
    return torch.full((len(w),), len(tab), dtype=torch.long).scatter_reduce(0, blk[tied], sid[tied], "amin")
