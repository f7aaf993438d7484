"""Rewards, baseline and losses of Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629, section 4.4).

A thought at position j is rewarded by how much it raises the log-likelihood of the next
n_true TRUE tokens (teacher-forced after the thought) over the prediction without a thought:

    r_j = sum_k [ NLL_base_k - NLL_thought_k ]

The baseline is the mean reward of the other thoughts sampled at the same position (the
reference's mean over ``n_passes``), so advantages sum to zero over a position's thoughts. As in
the reference (``remove_negative_rewards``), negative advantages may be clamped to 0. The
policy-gradient (REINFORCE) term is -mean(advantage.detach() * log pi(thought)), with
log pi from log_softmax(logits / reinforce_temperature). The total loss
(``first_and_last_mode``) is

    w * NLL(next token, no thought) + (1 - w) * NLL(true tokens after the thought)
        + policy_weight * L_policy.
"""

from __future__ import annotations

import torch

from phases.quietstar.config import QuietStarConfig

__all__ = ["talk_rewards", "baseline_subtract", "policy_loss", "thought_logprob", "quietstar_loss"]


def talk_rewards(nll_base: torch.Tensor, nll_thought: torch.Tensor) -> torch.Tensor:
    """Log-likelihood improvement of the true future tokens thanks to each thought.

    Args:
        nll_base: (B, N, L, K) or (B, 1, L, K): per-token negative log-likelihood of the
            K = n_true true future tokens without a thought (broadcasts over the N thoughts).
        nll_thought: (B, N, L, K): the same NLLs after each of the N thoughts per position.
    Returns:
        (B, N, L) rewards sum_k (nll_base - nll_thought); positive when the thought helped.
        Not detached: ``policy_loss`` detaches the advantages it is given.
    Raises:
        ValueError: the tensors are not 4-D or do not broadcast.
    """
    if nll_base.dim() != 4 or nll_thought.dim() != 4:
        raise ValueError(f"nll_base and nll_thought must be (B, N, L, K), got {tuple(nll_base.shape)} "
                         f"and {tuple(nll_thought.shape)}")
    try:
        torch.broadcast_shapes(nll_base.shape, nll_thought.shape)
    except RuntimeError:
        raise ValueError(f"nll_base {tuple(nll_base.shape)} does not broadcast with nll_thought "
                         f"{tuple(nll_thought.shape)}") from None
    return (nll_base - nll_thought).sum(dim=-1)


def baseline_subtract(r: torch.Tensor) -> torch.Tensor:
    """Advantages: rewards minus their mean over the thoughts of the same position.

    Args:
        r: (B, N, L) rewards of N thoughts per position (any shape with the thoughts on dim 1).
    Returns:
        Same shape; sums to zero over dim 1 for every position. N = 1 gives all zeros.
    Raises:
        ValueError: r has fewer than 2 dims.
    """
    if r.dim() < 2:
        raise ValueError(f"r must be (B, N, ...) with the thoughts on dim 1, got shape {tuple(r.shape)}")
    return r - r.mean(dim=1, keepdim=True)


def _position_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, L) per-position mask laid out as (B, 1, L, 1, ...), or a (B, N, L) per-thought mask
    as (B, N, L, 1, ...), to broadcast with ``like`` (B, N, L, ...). Returns a float 0/1 mask of
    ``like``'s full shape."""
    if mask.dim() == 2 and like.dim() >= 3:
        mask = mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (like.dim() - 3)))
    elif mask.dim() == 3 and like.dim() > 3:
        mask = mask.reshape(*mask.shape, *([1] * (like.dim() - 3)))
    return mask.to(like.dtype).expand_as(like)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` (see _position_mask) is set; 0 when none is."""
    if mask is None:
        return x.mean()
    m = _position_mask(mask, x)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def policy_loss(advantages: torch.Tensor, thought_logprobs: torch.Tensor, *, remove_negative: bool,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE loss -mean(advantage * log pi(thought)) over the positions that have thoughts.

    Args:
        advantages: (B, N, L) baseline-subtracted rewards; detached here (no gradient reaches them).
        thought_logprobs: (B, N, L) log pi of each thought: the sum over its sampled tokens of
            log_softmax(logits / reinforce_temperature) (see ``thought_logprob``).
        remove_negative: clamp negative advantages to 0 (only helpful thoughts are reinforced).
        mask: optional (B, L) per position or (B, N, L) per thought; True / 1 = counts (the
            position has a thought, the thought passed the filter). The mean runs over the
            unmasked entries; with none, the loss is 0.
    Returns:
        0-d loss; its gradient flows to ``thought_logprobs`` only.
    Raises:
        ValueError: the shapes differ.
    """
    if advantages.shape != thought_logprobs.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and thought_logprobs "
                         f"{tuple(thought_logprobs.shape)} must have the same shape (B, N, L)")
    adv = advantages.detach()
    if remove_negative:
        adv = adv.clamp_min(0.0)
    return -_masked_mean(adv * thought_logprobs, mask)


def thought_logprob(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Log-probability of each sampled thought under the tempered policy.

    Pass the logits the tokens were sampled from, with the delimiters masked as when sampling
    (``sampling.mask_thought_delimiters``), so the policy's support is the sampler's.

    Args:
        logits: (..., S, V) logits that produced each of the S thought tokens.
        tokens: (..., S) long, the sampled tokens.
        temperature: > 0 (the config's reinforce_temperature; 3 in the reference).
    Returns:
        (...) sum over S of log_softmax(logits / temperature) at the sampled tokens (float32 or wider).
    Raises:
        ValueError: shapes do not match or temperature <= 0.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits (..., S, V) {tuple(logits.shape)} and tokens (..., S) {tuple(tokens.shape)} "
                         "do not match")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., S, V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1).sum(dim=-1)


def quietstar_loss(nll_base_next: torch.Tensor, nll_talk: torch.Tensor, advantages: torch.Tensor,
                   thought_logprobs: torch.Tensor, cfg: QuietStarConfig,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The total Quiet-STaR loss and its parts.

    loss = cfg.base_loss_weight * mean(nll_base_next) + (1 - cfg.base_loss_weight) * mean(nll_talk)
           + cfg.policy_weight * policy_loss(advantages, thought_logprobs)

    Args:
        nll_base_next: per-token NLL of the next token without a thought, e.g. (B, L); the mean
            runs over all its entries (drop padding before calling).
        nll_talk: (B, N, L, K) NLL of the K true tokens after each thought (the mixed prediction).
        advantages: (B, N, L) baseline-subtracted rewards (detached inside).
        thought_logprobs: (B, N, L) log pi of each thought.
        cfg: supplies base_loss_weight, policy_weight, remove_negative_rewards.
        mask: optional (B, L) per position or (B, N, L) per thought; True / 1 = counts.
            Restricts the means of nll_talk and of the policy term (and reward_mean) to those.
    Returns:
        ``{"loss": total (with gradient), "base_nll", "talk_nll", "policy_loss", "reward_mean"}``,
        the parts detached; reward_mean is the mean advantage that weights the policy gradient
        (after clamping when remove_negative_rewards) over the positions with thoughts.
    """
    w = cfg.base_loss_weight
    base = nll_base_next.mean()
    talk = _masked_mean(nll_talk, mask)
    pol = policy_loss(advantages, thought_logprobs, remove_negative=cfg.remove_negative_rewards, mask=mask)
    adv = advantages.detach().clamp_min(0.0) if cfg.remove_negative_rewards else advantages.detach()
    total = w * base + (1.0 - w) * talk + cfg.policy_weight * pol
    return {"loss": total, "base_nll": base.detach(), "talk_nll": talk.detach(), "policy_loss": pol.detach(),
            "reward_mean": _masked_mean(adv, mask)}
