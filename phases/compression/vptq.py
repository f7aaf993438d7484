"""VPTQ (Liu et al., EMNLP 2024): vector post-training quantisation with Hessian-weighted k-means
codebooks, GPTQ-style error feedback and a residual codebook. Plain PyTorch.

Following microsoft/VPTQ's ``fast_vector_quant`` (branch ``algorithm``) for a weight ``W``
(out x in) and a Hessian ``H = X^T X`` of the layer's inputs (identity when none is given):

0. optional (``normalize``): per output channel min-max normalisation, ``W = (W - min) / (max - min)``;
   optional (``permute``): input columns in order of decreasing ``diag(H)``;
1. vectors of ``vector_len`` along the output dim (each column cut into ``out / v`` sub-vectors);
   k-means codebook of ``centroids`` vectors, each vector weighted by its column's ``H_jj``;
2. a GPTQ pass: column by column, each vector to its nearest centroid, the column's error
   ``(w - q) / U_jj`` fed into the later columns through the upper Cholesky factor ``U`` of
   ``H^-1`` (``damp`` x mean(diag H) added to H first);
3. with ``residual_centroids``: a second codebook, k-means on the residual ``W - Q``, and a
   second GPTQ pass quantising each vector as main + residual centroid.

:attr:`VPTQTensor.bits_per_weight` counts every stored bit: indices (``log2`` of each codebook
size per vector), both codebooks in float16, the normalisation's scale and offset per output
channel in float16, and the permutation. On small layers the codebooks dominate: choose small
codebooks there (the VPTQ paper's 65,536 x 8 codebook is 1 MiB per layer).

Hand-written: VPTQ's own package ships CUDA inference kernels and its quantiser needs cuML; the
algorithm is small enough to state here in PyTorch, on CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from phases.compression.stored import StoredBits

__all__ = ["VPTQTensor", "compress", "hessian_from_inputs", "kmeans"]


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` of a layer's inputs ``x`` (..., in), in float64."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / max(1, x.shape[0])


def kmeans(vectors: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, iters: int = 100,
           tol: float = 1e-5, seed: int = 0) -> torch.Tensor:
    """Weighted k-means (Lloyd) of ``vectors`` (n, v) into ``k`` centroids (k, v); initial
    centroids are ``k`` distinct vectors drawn with a seeded generator. Stops after ``iters``
    or when the weighted inertia improves by less than ``tol`` relatively."""
    n = len(vectors)
    weights = torch.ones(n, dtype=vectors.dtype) if weights is None else weights.to(vectors.dtype)
    g = torch.Generator().manual_seed(seed)
    cent = vectors[torch.randperm(n, generator=g)[: min(k, n)]].clone()
    if len(cent) < k:  # fewer vectors than centroids: repeat (the extra ones stay unused)
        cent = torch.cat([cent, cent[torch.randint(len(cent), (k - len(cent),), generator=g)]])
    prev = math.inf
    for _ in range(iters):
        assign = torch.cdist(vectors, cent).argmin(1)
        inertia = float((weights * ((vectors - cent[assign]) ** 2).sum(1)).sum())
        sums = torch.zeros_like(cent).index_add_(0, assign, vectors * weights[:, None])
        mass = torch.zeros(k, dtype=vectors.dtype).index_add_(0, assign, weights)
        filled = mass > 0
        cent[filled] = sums[filled] / mass[filled, None]
        if prev - inertia <= tol * max(prev, 1e-30):
            break
        prev = inertia
    return cent


@dataclass(frozen=True)
class VPTQTensor(StoredBits):
    shape: tuple[int, int]
    vector_len: int
    codebook: torch.Tensor  # (k, v) float16
    indices: torch.Tensor  # (out / v, in) int64: main centroid per vector
    residual_codebook: torch.Tensor | None  # (k_res, v) float16
    residual_indices: torch.Tensor | None
    scale: torch.Tensor | None  # (out,) float16, normalisation
    offset: torch.Tensor | None  # (out,) float16
    perm: torch.Tensor | None  # (in,) int64: column order used
    dtype: torch.dtype = torch.float32

    @property
    def total_bits(self) -> int:
        n_vec = self.indices.numel()
        bits = n_vec * math.ceil(math.log2(len(self.codebook))) + self.codebook.numel() * 16
        if self.residual_codebook is not None:
            bits += n_vec * math.ceil(math.log2(len(self.residual_codebook))) + self.residual_codebook.numel() * 16
        if self.scale is not None:
            bits += (self.scale.numel() + self.offset.numel()) * 16
        if self.perm is not None:
            bits += self.perm.numel() * max(1, math.ceil(math.log2(self.shape[1])))
        return bits



    def decompress(self) -> torch.Tensor:
        out, cols = self.shape
        q = self.codebook.float()[self.indices]  # (out/v, in, v)
        if self.residual_codebook is not None:
            q = q + self.residual_codebook.float()[self.residual_indices]
        w = q.permute(0, 2, 1).reshape(-1, cols)[:out]  # (out, in) in the permuted column order
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.scale is not None:
            w = w * self.scale.float()[:, None] + self.offset.float()[:, None]
        return w.to(self.dtype)


def _nearest(vecs: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(vecs, codebook).argmin(1)


def _gptq_pass(w: torch.Tensor, u: torch.Tensor, v: int, codebook: torch.Tensor,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantise columns left to right with error feedback; returns (Q, main idx, residual idx)."""
    w = w.clone()
    out_pad, cols = w.shape
    q = torch.zeros_like(w)
    idx = torch.zeros(out_pad // v, cols, dtype=torch.long)
    ridx = torch.zeros(out_pad // v, cols, dtype=torch.long) if residual is not None else None
    for j in range(cols):
        vecs = w[:, j].reshape(-1, v)
        i = _nearest(vecs, codebook)
        col_q = codebook[i]
        if residual is not None:
            r = _nearest(vecs - col_q, residual)
            col_q = col_q + residual[r]
            ridx[:, j] = r
        idx[:, j] = i
        q[:, j] = col_q.reshape(-1)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return q, idx, ridx


def compress(weight: torch.Tensor, *, hessian: torch.Tensor | None = None, vector_len: int = 4,
             centroids: int = 256, residual_centroids: int = 0, normalize: bool = False, permute: bool = True,
             damp: float = 0.01, kiter: int = 100, ktol: float = 1e-5, seed: int = 0) -> VPTQTensor:
    """Quantise a 2-D ``weight`` (out x in) with VPTQ (see the module docstring).

    Args:
        hessian: (in x in) ``X^T X`` of the layer's inputs (:func:`hessian_from_inputs`);
            None: the identity (plain k-means VQ, no error feedback).
        vector_len: ``v``, weights per vector (along the output dim).
        centroids: main codebook size (a power of two is stored exactly; others round up).
        residual_centroids: residual codebook size; 0: none.

    Raises:
        ValueError: not 2-D, bad sizes, or non-finite values.
    """
    if weight.dim() != 2:
        raise ValueError(f"VPTQ quantises 2-D weights, got shape {tuple(weight.shape)}")
    if vector_len < 1 or centroids < 2 or residual_centroids < 0 or residual_centroids == 1:
        raise ValueError(f"bad VPTQ sizes: vector_len={vector_len}, centroids={centroids}, "
                         f"residual_centroids={residual_centroids}")
    if not torch.isfinite(weight).all():
        raise ValueError("VPTQ: the weight has NaN or infinite values")
    out, cols = weight.shape
    w = weight.detach().double().cpu()
    h = torch.eye(cols, dtype=torch.float64) if hessian is None else hessian.detach().double().cpu().clone()
    if h.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight of {cols} inputs, got {tuple(h.shape)}")
    scale = offset = perm = None
    if normalize:
        lo, hi = w.amin(1), w.amax(1)
        scale, offset = (hi - lo).clamp_min(1e-8).half(), lo.half()
        w = (w - offset.double()[:, None]) / scale.double()[:, None]
    if permute:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    dead = torch.diagonal(h) == 0  # inputs that never fire: as GPTQ, no error lands there
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pad = (-out) % vector_len
    w = torch.cat([w, w[-1:].expand(pad, cols)]) if pad else w  # padding rows repeat the last row
    col_weight = torch.diagonal(h).expand(w.shape[0] // vector_len, cols).T.reshape(-1)
    vecs = w.T.reshape(cols, -1, vector_len).reshape(-1, vector_len)  # column by column
    codebook = kmeans(vecs, centroids, weights=col_weight, iters=kiter, tol=ktol, seed=seed).half().double()
    residual = None
    if residual_centroids:
        q, _, _ = _gptq_pass(w, u, vector_len, codebook, None)
        res = (w - q).T.reshape(-1, vector_len)
        residual = kmeans(res, residual_centroids, weights=col_weight, iters=kiter, tol=ktol, seed=seed + 1)
        residual = residual.half().double()
    _, idx, ridx = _gptq_pass(w, u, vector_len, codebook, residual)
    return VPTQTensor((out, cols), vector_len, codebook.half(), idx, residual.half() if residual is not None else None,
                      ridx, scale, offset, perm, weight.dtype)
