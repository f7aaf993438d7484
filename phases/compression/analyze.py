"""The model analyzer's measurements: per-weight statistics and sensitivity.

Sensitivity is measured, not guessed: for every weight matrix, the held-out log-perplexity of the
model with that one matrix replaced by its 4-bit round-to-nearest reconstruction (group 32),
minus the unchanged model's (the layer-wise sensitivity probe of HAWQ-style mixed-precision
work, done by evaluation rather than a Hessian trace). A layer whose loss barely moves can take
fewer bits and more sparsity.

The compression potential is an estimate and says so: the ratio vs fp32 if the least sensitive
half of the weights (by count) went to 4 bits and the rest to 8 bits, small tensors at 16.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from phases.compression import rtn
from phases.data.corpus import Corpus, evaluate_perplexity

__all__ = ["analyze", "weight_matrices"]


def weight_matrices(model: nn.Module, min_weights: int = 256) -> dict[str, torch.Tensor]:
    """``name -> tensor`` of the 2-D parameters with at least ``min_weights`` entries (the
    tensors the codecs compress; the rest stay float16)."""
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and p.numel() >= min_weights}


@torch.no_grad()
def analyze(model: nn.Module, corpus: Corpus, *, batch_size: int = 8, max_batches: int = 2,
            min_weights: int = 256) -> dict[str, Any]:
    """Statistics and measured sensitivity of every weight matrix of ``model`` (restored after).

    Returns:
        ``{"base_log_ppl", "layers": {name: {shape, numel, mean_abs, std, max_abs, zeros,
        sensitivity}}, "params", "potential_ratio_estimate"}``; ``sensitivity`` is the increase in
        held-out log-perplexity (>= 0 means worse) when the matrix alone is quantized to int4.
    """
    def log_ppl() -> float:
        return math.log(evaluate_perplexity(model, corpus, batch_size=batch_size, max_batches=max_batches))

    base = log_ppl()
    layers: dict[str, dict[str, Any]] = {}
    for name, p in weight_matrices(model, min_weights).items():
        w = p.detach().clone()
        layers[name] = {"shape": list(w.shape), "numel": w.numel(), "mean_abs": float(w.abs().mean()),
                        "std": float(w.std()), "max_abs": float(w.abs().max()), "zeros": float((w == 0).float().mean())}
        p.copy_(rtn.compress(w, bits=4, group_size=32).decompress())
        try:
            layers[name]["sensitivity"] = log_ppl() - base
        finally:
            p.copy_(w)
    total = sum(p.numel() for p in model.parameters())
    big = sorted(layers, key=lambda n: layers[n]["sensitivity"])
    half, bits, count = sum(layers[n]["numel"] for n in big) / 2, 0.0, 0
    for n in big:
        bits += layers[n]["numel"] * (4 if count < half else 8)
        count += layers[n]["numel"]
    bits += (total - count) * 16
    return {"base_log_ppl": base, "layers": layers, "params": total,
            "potential_ratio_estimate": 32.0 * total / bits if bits else 1.0}
