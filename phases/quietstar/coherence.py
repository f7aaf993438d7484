"""Coherence scores of sampled thoughts, and the threshold filter.

The reference analysis names four criteria with weights (semantic similarity 30%, logical
consistency 25%, relevance 25%, fluency 20%) but not how they are computed. Here three are
computed, each in [0, 1], from things the model itself defines:

- semantic similarity: (1 + cos(e_thought, e_context)) / 2, where e_* is the mean input
  embedding of the thought's tokens and of the ``context`` tokens before (and including) the
  position the thought is anchored at: does the thought talk about what the text talks about.
- relevance: (1 + cos(e_thought, e_future)) / 2 against the mean embedding of the true next
  tokens the thought is meant to help predict (known in training, where the filter acts).
- fluency: exp(mean log-probability of the thought's tokens under the model at temperature 1),
  the inverse per-token perplexity of the thought.

Logical consistency is left out: nothing in a language model's own outputs measures it without
an external checker, and a made-up proxy would be theatre. The coherence score is the weighted
mean of the three, with the reference's weights renormalised over them (0.30 : 0.25 : 0.20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["WEIGHTS", "coherence_scores"]

# The reference's weights of the three criteria computed here; the mean renormalises them.
WEIGHTS = {"semantic": 0.30, "relevance": 0.25, "fluency": 0.20}


def _mean_embedding(embed: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``embed[ids]`` over the last dim of ``ids`` where ``valid``; (..., d)."""
    vec = embed[ids]  # (..., n, d)
    if valid is None:
        return vec.mean(dim=-2)
    w = valid.to(vec.dtype).unsqueeze(-1)
    return (vec * w).sum(dim=-2) / w.sum(dim=-2).clamp_min(1.0)


def coherence_scores(embed: torch.Tensor, thought_ids: torch.Tensor, thought_logprobs: torch.Tensor,
                     context_ids: torch.Tensor, future_ids: torch.Tensor, *,
                     context_valid: torch.Tensor | None = None,
                     future_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Score every thought; see the module docstring for the formulas.

    Args:
        embed: (V, d) the model's input embedding matrix.
        thought_ids: (..., m) the sampled thought tokens (without start/end).
        thought_logprobs: (..., m) log-probability of each sampled token under the model at
            temperature 1 (the delimiters masked, as when sampling).
        context_ids: (..., W) the tokens up to and including the thought's anchor.
        future_ids: (..., K) the true tokens after the anchor.
        context_valid, future_valid: optional bool masks of the same shapes (False = no token,
            e.g. before the start of the sequence); a row with none scores similarity 0.5.
    Returns:
        ``{"semantic", "relevance", "fluency", "coherence"}``, each (...) float in [0, 1],
        detached.
    Raises:
        ValueError: mismatched leading shapes or ids outside [0, V).
    """
    lead = thought_ids.shape[:-1]
    for name, t in (("thought_logprobs", thought_logprobs), ("context_ids", context_ids),
                    ("future_ids", future_ids)):
        if t.shape[:-1] != lead:
            raise ValueError(f"{name} has leading shape {tuple(t.shape[:-1])}, thought_ids has {tuple(lead)}")
    if thought_logprobs.shape != thought_ids.shape:
        raise ValueError(f"thought_logprobs {tuple(thought_logprobs.shape)} must match thought_ids "
                         f"{tuple(thought_ids.shape)}")
    vocab = embed.shape[0]
    for name, t in (("thought_ids", thought_ids), ("context_ids", context_ids), ("future_ids", future_ids)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"{name} must be token ids in [0, {vocab})")
    with torch.no_grad():
        e = embed.detach().float()
        thought = _mean_embedding(e, thought_ids, None)
        context = _mean_embedding(e, context_ids, context_valid)
        future = _mean_embedding(e, future_ids, future_valid)
        semantic = (1.0 + F.cosine_similarity(thought, context, dim=-1, eps=1e-8)) / 2.0
        relevance = (1.0 + F.cosine_similarity(thought, future, dim=-1, eps=1e-8)) / 2.0
        fluency = thought_logprobs.detach().float().mean(dim=-1).exp()
        total = sum(WEIGHTS.values())
        coherence = (WEIGHTS["semantic"] * semantic + WEIGHTS["relevance"] * relevance
                     + WEIGHTS["fluency"] * fluency) / total
    return {"semantic": semantic.clamp(0.0, 1.0), "relevance": relevance.clamp(0.0, 1.0),
            "fluency": fluency.clamp(0.0, 1.0), "coherence": coherence.clamp(0.0, 1.0)}
