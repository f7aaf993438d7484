"""The distillation student: the input model with narrower feed-forward blocks.

Every SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``) keeps the ``fraction`` of its neurons
that score highest (the structured-pruning score of :mod:`phases.compression.pruning`: the
product of the gate row, up row and down column norms) and loses the rest physically: the
student is a smaller model (``intermediate_size`` shrinks in its config), initialised from the
teacher's surviving weights, then distilled (:func:`phases.compression.distill.distill`). This
is the width-pruning + distillation recipe of Minitron (Muralidharan et al. 2024) at one width.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["narrow_ffn"]


@torch.no_grad()
def narrow_ffn(model: nn.Module, fraction: float) -> nn.Module:
    """A copy of ``model`` whose MLPs keep ``round(fraction x d_ff)`` neurons (at least 1).

    The model's config must name the width ``intermediate_size`` (as HF decoders do).

    Raises:
        ValueError: ``fraction`` outside (0, 1], or a model without SwiGLU MLPs / intermediate_size.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    cfg = getattr(model, "config", None)
    d_ff = getattr(cfg, "intermediate_size", None)
    if d_ff is None:
        raise ValueError("the model's config has no intermediate_size; cannot narrow its MLPs")
    keep_n = max(1, int(round(fraction * d_ff)))
    student = copy.deepcopy(model)
    found = 0
    for _, m in student.named_modules():
        if not all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            continue
        g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        score = (g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)).double()  # (d_ff,)
        keep = torch.sort(torch.argsort(score, descending=True, stable=True)[:keep_n]).values
        for proj, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
            old = getattr(m, proj)
            w = old.weight[keep] if rows else old.weight[:, keep]
            new = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
            new.weight.copy_(w)
            setattr(m, proj, new)
        found += 1
    if not found:
        raise ValueError("no SwiGLU MLP (gate_proj, up_proj, down_proj) in the model")
    student.config.intermediate_size = keep_n
    return student
