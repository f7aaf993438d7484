"""Pruning for phase 8: magnitude (unstructured), structured (attention heads, MLP neurons) and
gradient-based (first-order Taylor) masks, and the reference's progressive schedule
(20% -> 40% -> 60%). Plain PyTorch on ``nn.Module`` s.

A pruning result is a dict ``parameter name -> bool mask`` (True = kept) of the pruned weights;
:func:`apply_masks` zeroes the pruned entries in place. Which weights are prunable: every
``nn.Linear`` weight except the output head (and embeddings, which are not Linear), so the
vocabulary projection keeps full precision, as compression methods usually leave it.

Structured pruning scores a whole unit and removes it from every tensor it feeds:

- an MLP neuron ``i`` of a SwiGLU block (``gate_proj``, ``up_proj``, ``down_proj``): row ``i`` of
  gate and up, column ``i`` of down; score = the product of the L2 norms of gate row, up row
  and down column (how much the neuron can contribute for unit input);
- an attention head ``h`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of ``n_heads`` heads):
  its rows of q, k, v and its columns of o; score = ||v rows||_F x ||o columns||_F (the path a
  head's output takes; q and k only shape its attention pattern).

Gradient-based importance is ``|w x dL/dw|`` summed over calibration batches (Molchanov et al.
2017's first-order Taylor estimate of the loss change when ``w`` is removed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["apply_masks", "gradient_importance", "layer_sparsities", "magnitude_masks", "progressive_schedule",
           "prunable", "prune", "sparsity", "structured_masks", "taylor_masks"]

Masks = dict[str, torch.Tensor]


def prunable(model: nn.Module, *, skip: Iterable[str] = ("lm_head",)) -> dict[str, nn.Parameter]:
    """``name -> weight`` of every ``nn.Linear`` whose name does not contain a ``skip`` part."""
    skip = tuple(skip)
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)}


def progressive_schedule(final: float = 0.6, steps: int = 3) -> list[float]:
    """Evenly rising sparsities ending at ``final``: (0.6, 3) -> [0.2, 0.4, 0.6] (the reference's)."""
    if not 0.0 <= final < 1.0 or steps < 1:
        raise ValueError(f"need 0 <= final < 1 and steps >= 1, got final={final}, steps={steps}")
    return [round(final * (i + 1) / steps, 10) for i in range(steps)]


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask keeping the ``1 - sparsity`` highest scores (exactly ``round(sparsity x n)`` pruned;
    ties broken by position, so masks are deterministic)."""
    n = scores.numel()
    k = int(round(sparsity * n))
    mask = torch.ones(n, dtype=torch.bool)
    if k:
        order = torch.argsort(scores.reshape(-1).double(), stable=True)
        mask[order[:k]] = False
    return mask.reshape(scores.shape)


def _check(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def magnitude_masks(model: nn.Module, sparsity: float, *, scope: str = "layer") -> Masks:
    """Prune the smallest ``|w|``: per weight matrix (``scope="layer"``) or over all prunable
    weights together (``"global"``)."""
    return _score_masks({n: w.detach().abs() for n, w in prunable(model).items()}, sparsity, scope)


def _score_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> Masks:
    _check(sparsity)
    if scope == "layer":
        return {n: _keep_top(s, sparsity) for n, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    keep = _keep_top(flat, sparsity)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].reshape(scores[n].shape)
        start += size
    return out


def gradient_importance(model: nn.Module, batches: Iterable[torch.Tensor],
                        loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``sum over batches of |w x dL/dw|`` for every prunable weight. ``loss_fn(model, batch)``
    defaults to the causal LM loss of ``model(input_ids=batch, labels=batch)``."""
    weights = prunable(model)
    scores = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch) if loss_fn else model(input_ids=batch, labels=batch).loss
            loss.backward()
            for n, w in weights.items():
                if w.grad is not None:
                    scores[n] += (w.detach() * w.grad).abs().double()
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return scores


def taylor_masks(model: nn.Module, batches: Iterable[torch.Tensor], sparsity: float, *, scope: str = "layer",
                 loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Masks:
    """Gradient-based pruning: prune the smallest first-order Taylor importances."""
    _check(sparsity)
    return _score_masks(gradient_importance(model, batches, loss_fn), sparsity, scope)


def structured_masks(model: nn.Module, sparsity: float, *, unit: str, n_heads: int | None = None) -> Masks:
    """Prune whole MLP neurons (``unit="neuron"``) or attention heads (``unit="head"``) in every
    block that has them, ``round(sparsity x units)`` per block (see the module docstring). A
    module counts as attention when it says its head count (``heads`` / ``num_heads``), or for
    every q/k/v/o module when ``n_heads`` is given.

    Raises:
        ValueError: a bad unit or sparsity, or no such units in the model.
    """
    _check(sparsity)
    modules = dict(model.named_modules())
    masks: Masks = {}
    if unit == "neuron":
        for name, m in modules.items():
            if not all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
                continue
            g, u, d = m.gate_proj.weight.detach(), m.up_proj.weight.detach(), m.down_proj.weight.detach()
            keep = _keep_top(g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0), sparsity)  # (d_ff,)
            masks[f"{name}.gate_proj.weight"] = keep[:, None].expand_as(g).clone()
            masks[f"{name}.up_proj.weight"] = keep[:, None].expand_as(u).clone()
            masks[f"{name}.down_proj.weight"] = keep[None, :].expand_as(d).clone()
    elif unit == "head":
        for name, m in modules.items():
            if not all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                continue
            heads = n_heads or getattr(m, "heads", None) or getattr(m, "num_heads", None)
            if not heads:
                continue  # q/k/v/o projections without heads (e.g. Cognate's memory): not attention heads
            v, o = m.v_proj.weight.detach(), m.o_proj.weight.detach()
            dh = v.shape[0] // heads
            score = v.reshape(heads, dh, -1).norm(dim=(1, 2)) * o.reshape(o.shape[0], heads, dh).norm(dim=(0, 2))
            keep = _keep_top(score, sparsity).repeat_interleave(dh)  # per output row of q, k, v
            for p in ("q_proj", "k_proj", "v_proj"):
                w = getattr(m, p).weight
                masks[f"{name}.{p}.weight"] = keep[:, None].expand_as(w).clone()
            masks[f"{name}.o_proj.weight"] = keep[None, :].expand_as(o).clone()
    else:
        raise ValueError(f"unit must be 'neuron' or 'head', got {unit!r}")
    if not masks:
        raise ValueError(f"no {unit} units found in the model (expected SwiGLU MLPs / q,k,v,o attention)")
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned entries of ``model``'s weights in place.

    Raises:
        KeyError: a mask names a parameter the model does not have.
        ValueError: a mask's shape differs from its parameter's.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r}: the model has no such parameter")
        if mask.shape != params[name].shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(params[name].shape)}")
        params[name].mul_(mask.to(params[name].dtype))


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable weights."""
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    return sum(int((w == 0).sum()) for w in weights.values()) / max(1, total)


def layer_sparsities(sensitivity: dict[str, float], target: float, spread: float) -> dict[str, float]:
    """Per-weight sparsities averaging ``target`` (unweighted mean over the weights given), lower
    for the more sensitive: rank r of n (0 = least sensitive) gets
    ``target x (1 + spread x (1 - 2r/(n-1)))``, clamped to [0, 0.95]. ``spread`` 0: all equal."""
    names = sorted(sensitivity, key=lambda n: (sensitivity[n], n))
    n = len(names)
    if n < 2 or spread == 0:
        return {k: target for k in names}
    return {k: min(0.95, max(0.0, target * (1 + spread * (1 - 2 * r / (n - 1))))) for r, k in enumerate(names)}


def prune(model: nn.Module, *, method: str, sparsity: float, per_weight: dict[str, float] | None = None,
          batches: Iterable[torch.Tensor] = (), n_heads: int | None = None) -> Masks:
    """Prune ``model`` in place and return its masks.

    Args:
        method: ``magnitude`` | ``taylor`` (first-order Taylor on ``batches``) | ``structured``
            (whole MLP neurons at ``sparsity``; per-weight sparsities do not apply to units).
        sparsity: the target fraction of zeros.
        per_weight: ``name -> sparsity`` (e.g. :func:`layer_sparsities`); other prunable weights
            get ``sparsity``. Unstructured methods only.
    Raises:
        ValueError: an unknown method (the valid ones named) or a bad sparsity.
    """
    if method == "structured":
        masks = structured_masks(model, sparsity, unit="neuron")
    elif method in ("magnitude", "taylor"):
        if method == "taylor":
            scores = {n: s.float() for n, s in gradient_importance(model, list(batches)).items()}
        else:
            scores = {n: w.detach().abs() for n, w in prunable(model).items()}
        masks = {}
        for name, score in scores.items():
            s = (per_weight or {}).get(name, sparsity)
            _check(s)
            masks[name] = _keep_top(score, s)
    else:
        raise ValueError(f"unknown pruning method {method!r}; valid: magnitude, taylor, structured")
    apply_masks(model, masks)
    return masks
