"""The mixing head of Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629, section 4.3): how much
of the post-thought prediction to use at each position.

As the reference's "complex talk head" (ezelikman/quiet-star, ``modeling_mistral.py`` with
``use_weighted_talk_head``, ``use_concat_talk_head``, ``use_complex_talk_head``): an MLP on the
concatenated hidden states with and without the thought gives a scalar weight w, and the mixed
state is (1 - w) * h_base + w * h_thought. Because the LM head is linear without bias, mixing the
hidden states is mixing the logits. The last layer starts at zero, so training starts from the
base model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MixingHead"]


class MixingHead(nn.Module):
    """MLP(2 * hidden -> m, ReLU, m -> m, ReLU, m -> 1) giving the mixing weight w per position."""

    def __init__(self, hidden: int, mlp_hidden: int | None = None):
        """Build the head.

        Args:
            hidden: d, the size of the hidden states to mix.
            mlp_hidden: m, the MLP's width; None = d (as in the reference).
        Raises:
            ValueError: hidden or mlp_hidden < 1.
        """
        super().__init__()
        m = hidden if mlp_hidden is None else mlp_hidden
        if hidden < 1 or m < 1:
            raise ValueError(f"hidden and mlp_hidden must be >= 1, got hidden={hidden}, mlp_hidden={mlp_hidden}")
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, m), nn.ReLU(), nn.Linear(m, m), nn.ReLU(), nn.Linear(m, 1))
        nn.init.zeros_(self.mlp[-1].weight)  # w = 0 at the start: the base model exactly
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the hidden states without and with the thought.

        w is NOT squashed by a sigmoid (as in the reference code, not as the paper's text
        suggests): it is unconstrained and may leave [0, 1].

        Args:
            h_base: (..., d) hidden state predicting the next token without a thought.
            h_thought: (..., d) hidden state after the thought, same shape.
        Returns:
            ``(h_mix, w)``: h_mix (..., d) = (1 - w) * h_base + w * h_thought, computed as
            h_base + w * (h_thought - h_base) so that w == 0 returns h_base bit for bit; w (..., 1).
        Raises:
            ValueError: the shapes differ or the last dim is not d.
        """
        if h_base.shape != h_thought.shape or h_base.shape[-1] != self.hidden:
            raise ValueError(f"h_base and h_thought must both have shape (..., {self.hidden}), "
                             f"got {tuple(h_base.shape)} and {tuple(h_thought.shape)}")
        w = self.mlp(torch.cat([h_base, h_thought], dim=-1))  # (..., 1)
        return h_base + w * (h_thought - h_base), w
