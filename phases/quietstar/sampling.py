"""Sampling thought tokens (Quiet-STaR, Zelikman et al. 2024, arXiv 2403.09629).

Inside a thought the start- and end-of-thought tokens must never be sampled (the reference sets
their logits to -1e10; its README warns that the model never learns not to emit them, so they
are masked at inference too). The reference samples with hard Gumbel-softmax at temperature 1;
here the temperature and a nucleus (top-p, Holtzman et al. 2020) cut are configurable, and
sampling is deterministic under a seeded ``torch.Generator``.
"""

from __future__ import annotations

import torch

__all__ = ["mask_thought_delimiters", "sample_thought_tokens"]


def mask_thought_delimiters(logits: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """A copy of ``logits`` with the start- and end-of-thought logits set to -inf.

    Args:
        logits: (..., V) floating-point logits.
        start_id, end_id: the delimiter token ids, in [0, V).
    Returns:
        (..., V), same dtype; the input is not modified.
    Raises:
        ValueError: an id outside [0, V).
    """
    vocab = logits.shape[-1]
    for name, tok in (("start_id", start_id), ("end_id", end_id)):
        if not 0 <= tok < vocab:
            raise ValueError(f"{name} must be in [0, {vocab}) (the vocabulary of the logits), got {tok}")
    out = logits.clone()
    out[..., [start_id, end_id]] = float("-inf")
    return out


def sample_thought_tokens(logits: torch.Tensor, *, start_id: int, end_id: int, top_p: float, temperature: float,
                          generator: torch.Generator | None) -> torch.Tensor:
    """Sample one thought token per row: delimiters masked, then temperature, then top-p.

    Top-p keeps, per row, the smallest set of the most probable tokens whose total probability
    reaches ``top_p`` (always at least the most probable token) and renormalises over it.

    Args:
        logits: (..., V) next-token logits; V must exceed 2 (the delimiters are never drawn).
        start_id, end_id: the start/end-of-thought ids, never returned.
        top_p: in (0, 1]; 1 keeps the whole distribution.
        temperature: > 0; divides the logits.
        generator: seeded generator for reproducible draws (on the logits' device), or None.
    Returns:
        (...) long token ids.
    Raises:
        ValueError: top_p or temperature out of range, V <= 2, or a bad delimiter id.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    if vocab <= 2:
        raise ValueError(f"the vocabulary (last dim of logits) must exceed the 2 delimiters, got {vocab}")
    scaled = mask_thought_delimiters(logits, start_id, end_id).float() / temperature
    probs = torch.softmax(scaled.reshape(-1, vocab), dim=-1)  # (R, V)
    if top_p >= 1.0:  # no cut (a cumulative sum may round past 1 before the tail)
        return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # probability of the more likely tokens
    keep = before < top_p  # the first token always has before = 0 < top_p
    pick = torch.multinomial(sorted_p * keep, 1, generator=generator)  # (R, 1), index into the sort
    return order.gather(-1, pick).reshape(logits.shape[:-1])
