"""Calibration for GPTQ-style quantisers: the Hessian ``H = X^T X / n`` of every linear layer's
inputs, collected with forward hooks on a few training batches (GPTQ, Frantar et al. 2023,
section 3; VPTQ uses the same proxy). Embeddings and other non-linear weights get none.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["linear_hessians"]


@torch.no_grad()
def linear_hessians(model: nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``"<module>.weight" -> H`` (in x in, float64) for the ``nn.Linear`` layers of ``model``
    (only those whose weight name is in ``names`` when given), over ``model(input_ids=batch)``.

    A layer run several times per token (Cognate's pondered block) accumulates every call.
    """
    wanted = set(names) if names is not None else None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, m in model.named_modules():
        key = f"{mod_name}.weight"
        if not isinstance(m, nn.Linear) or (wanted is not None and key not in wanted):
            continue

        def hook(_m, args, _out, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (N, in)
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / counts[k] for k in sums}
