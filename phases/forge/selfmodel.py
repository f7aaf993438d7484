"""Self-modeling: the model learns to predict its own later hidden states (the reference's "tap
layers at depths 4, 8, 12 ... self-model weight 0.1").

Tap points are the outputs of the model's decoder blocks and, last, the final hidden state (the
LM head's input), captured with forward hooks, so any HF causal LM with a stack of blocks in an
``nn.ModuleList`` works (Cognate's ``model.layers``, GPT-2's ``transformer.h``, Llama's
``model.layers``). The tap fractions pick points of that depth (depth D = blocks + 1; a fraction
f picks point ``round(f * D)``, at least 1). For each pair of consecutive taps a linear head
maps the layer-normalised earlier state to a prediction of the layer-normalised later state;
the target is detached, so the signal shapes the earlier layers and the head, not the target.
The loss is the mean squared error averaged over pairs.

Hand-written: HF models do not expose a self-prediction head, and Cognate does not return
``hidden_states``; hooks work on every model without touching its forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfModel", "block_stack"]


def block_stack(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the ``nn.ModuleList`` of same-type modules with the most parameters.

    Raises:
        ValueError: the model has no such list.
    """
    best, size = None, -1
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size and n > 0:
                best, size = module, n
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to tap for self-modeling")
    return best


class SelfModel(nn.Module):
    """The self-model heads of one model and the hooks that feed them (module docstring)."""

    def __init__(self, model: nn.Module, taps: Sequence[float]):
        super().__init__()
        blocks = list(block_stack(model))
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings: no final hidden state to tap")
        points: list[nn.Module] = blocks + [head]  # the last point is the LM head's input
        depth = len(points)
        picked = sorted({min(depth, max(1, round(f * depth))) for f in taps})
        if len(picked) < 2:
            raise ValueError(f"the taps {list(taps)} pick fewer than 2 distinct points of a depth-{depth} model")
        self.points = tuple(p - 1 for p in picked)  # 0-based indices into blocks + [head]
        width = head.in_features
        self.heads = nn.ModuleList(nn.Linear(width, width) for _ in range(len(picked) - 1))
        self._states: dict[int, torch.Tensor] = {}
        self._hooks = []
        for i in self.points:
            if i < len(blocks):
                self._hooks.append(points[i].register_forward_hook(self._keep_output(i)))
            else:
                self._hooks.append(points[i].register_forward_pre_hook(self._keep_input(i)))

    def _keep_output(self, i: int):
        def hook(module, args, output):
            if torch.is_grad_enabled():  # training forwards only; evaluation runs under no_grad
                self._states[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def _keep_input(self, i: int):
        def hook(module, args):
            if torch.is_grad_enabled():
                self._states[i] = args[0]
        return hook

    def loss(self) -> torch.Tensor:
        """The self-model loss of the last forward pass (then forgets its states).

        Raises:
            RuntimeError: no forward pass ran since the last call.
        """
        if len(self._states) != len(self.points):
            raise RuntimeError("self-model loss without a forward pass of the model")
        states = [self._states[i] for i in self.points]
        self._states.clear()
        total = 0.0
        for head, src, dst in zip(self.heads, states, states[1:]):
            pred = head(F.layer_norm(src, src.shape[-1:]))
            total = total + F.mse_loss(pred, F.layer_norm(dst.detach(), dst.shape[-1:]))
        return total / len(self.heads)

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._states.clear()
