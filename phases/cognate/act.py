"""Adaptive Computation Time (Graves 2016, "Adaptive Computation Time for Recurrent Neural
Networks", arXiv 1603.08983), applied per token to a shared transformer block.

For every token the shared block is applied repeatedly (ponder steps n = 1, 2, ...); after
step n a halting unit gives h^n = sigmoid(W_h s^n + b_h). With threshold 1 - eps:

    N = min{ n' : sum_{n <= n'} h^n >= 1 - eps }      (capped at the step limit M)
    R = 1 - sum_{n < N} h^n                            (the remainder, > eps)
    p^n = h^n for n < N,  p^N = R,  p^n = 0 for n > N  (so sum_n p^n = 1)
    output = sum_n p^n s^n;   ponder cost rho = N + R

The loss adds ``tau * mean(rho)``; N is piecewise constant, so the gradient flows through R.
As in the Universal Transformer (Dehghani et al. 2019) every position keeps being updated
until all have halted (attention needs their states); a halted position's later states get
weight 0, so the output of a sequence is independent of other sequences in its batch and of
how many extra steps ran. Train-many / infer-few: the cap M is ``act_max_steps_train`` (8) in
training mode and ``act_max_steps_infer`` (2) in eval mode (the reference's "ACT thresholds"
0.95/0.90/0.99 are the per-variant 1 - eps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["halting_weights", "ACTPonder"]


def halting_weights(h: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ACT weights from the halting probabilities of the steps computed so far.

    The last step given is treated as the cap: a token that has not reached the threshold
    by then halts there (N = K). Passing more steps than a token needed never changes its
    result, which is what lets the pondering loop stop early once every token halted.

    Args:
        h: (..., K) halting probabilities h^1..h^K in [0, 1].
        threshold: 1 - eps, in (0, 1].
    Returns:
        p: (..., K) step weights, summing to 1 over K;
        N: (...) int64 number of steps used (1..K);
        R: (...) the remainder 1 - sum_{n<N} h^n (differentiable).
    """
    k = h.shape[-1]
    cum = h.cumsum(-1)  # (..., K): sum_{n <= k}
    reached = cum >= threshold
    reached[..., -1] = True  # the cap halts every token still running
    n_idx = reached.to(torch.int8).argmax(-1)  # (...): first step that reached (0-based)
    exclusive = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # sum_{n < k}
    remainder = 1.0 - exclusive.gather(-1, n_idx.unsqueeze(-1)).squeeze(-1)  # (...)
    steps = torch.arange(k, device=h.device)
    before = steps < n_idx.unsqueeze(-1)  # (..., K)
    at = steps == n_idx.unsqueeze(-1)  # (..., K)
    p = torch.where(before, h, torch.zeros_like(h)) + torch.where(at, remainder.unsqueeze(-1), torch.zeros_like(h))
    return p, n_idx + 1, remainder


class ACTPonder(nn.Module):
    """Applies ``block`` repeatedly with ACT halting; the block's weights are shared across steps.

    Args:
        block: a module called as ``block(x, **kwargs) -> x`` with x (B, T, C).
        hidden_size: C.
        max_steps: the largest step cap ever used (train cap); sizes the step embeddings.
        halt_bias: initial bias of the halting unit. Graves initialises it positive so that
            early training ponders little: 1.0 gives h ~= 0.73, i.e. N = 2 at any threshold
            in (0.73, 1.46].
    """

    def __init__(self, block: nn.Module, hidden_size: int, max_steps: int, halt_bias: float = 1.0):
        super().__init__()
        self.block = block
        # Which step is running (Graves feeds a first-step flag; the Universal Transformer a
        # timestep embedding). (M, C)
        self.step_embed = nn.Parameter(torch.zeros(max_steps, hidden_size))
        self.halt = nn.Linear(hidden_size, 1)
        # Every token starts at h = sigmoid(halt_bias) (the HF model's _init_weights agrees).
        nn.init.zeros_(self.halt.weight)
        nn.init.constant_(self.halt.bias, halt_bias)

    def forward(self, x: torch.Tensor, threshold: float, max_steps: int,
                block_kwargs: dict | None = None,
                halted: Callable[[torch.Tensor], bool] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ponder over x.

        Args:
            x: (B, T, C) input states s^0.
            threshold: 1 - eps.
            max_steps: step cap M for this call (<= the ``max_steps`` the module was built with).
            block_kwargs: extra arguments of the block (rotary tables, attention mask).
            halted: optional predicate on the (B, T) cumulative halting sums; the loop stops
                early when it is true. Default: every token reached the threshold.
        Returns:
            y: (B, T, C) the ACT-weighted mix of the states;
            rho: (B, T) ponder cost N + R (differentiable through R);
            n: (B, T) int64 steps used N.
        """
        if not 1 <= max_steps <= self.step_embed.shape[0]:
            raise ValueError(f"max_steps must be in [1, {self.step_embed.shape[0]}], got {max_steps}")
        kwargs = block_kwargs or {}
        state = x
        states: list[torch.Tensor] = []
        hs: list[torch.Tensor] = []
        for n in range(max_steps):
            state = self.block(state + self.step_embed[n], **kwargs)  # (B, T, C)
            states.append(state)
            hs.append(torch.sigmoid(self.halt(state)).squeeze(-1))  # (B, T)
            cum = torch.stack(hs, dim=-1).cumsum(-1)[..., -1].detach()  # (B, T)
            done = halted(cum) if halted is not None else bool((cum >= threshold).all())
            if done:
                break
        p, n_steps, remainder = halting_weights(torch.stack(hs, dim=-1), threshold)  # (B, T, K)
        # Accumulate in step order: extra steps add exact zeros, so early exit is bit-exact.
        y = torch.zeros_like(x)
        for i, s in enumerate(states):
            y = y + p[..., i:i + 1] * s
        return y, n_steps.to(remainder.dtype) + remainder, n_steps
