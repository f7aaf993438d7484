"""Attention mask and position ids for thoughts at every position, generated in parallel
without a KV cache (Quiet-STaR, Zelikman et al. 2024, arXiv 2403.09629, section 4.2).

The reference (ezelikman/quiet-star, ``modeling_mistral.py``) runs one forward per thought step
over the whole sequence with a KV cache, extending the mask each step with ``eye(L)``: query
position i sees the causal prefix <= i plus only its OWN earlier thought tokens. Here the same
attention pattern is written out over one extended sequence, so that a plain forward (no cache)
over all tokens computes the same thing. For a base sequence of length L after s thought steps,
the extended sequence has T = L * (1 + s) tokens:

    [ base 0 .. L-1 | thought step 0 of positions 0 .. L-1 | ... | step s-1 of 0 .. L-1 ]

so index ``L + j * L + i`` is the j-th thought token (0-based) anchored at base position i.
"""

from __future__ import annotations

import torch

__all__ = ["thought_layout", "thought_attention_mask", "thought_position_ids"]


def _check_sizes(seq_len: int, steps: int) -> None:
    """Raise ValueError unless seq_len >= 1 and steps >= 0."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def thought_layout(seq_len: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which base position and which depth every token of the extended sequence has.

    Args:
        seq_len: L, the base sequence length.
        steps: s, thought tokens per position so far.
    Returns:
        ``(anchors, depth)``, both (T,) long with T = L * (1 + s): ``anchors[t]`` is the base
        position token t belongs to (i for base token i and for every thought token of position
        i); ``depth[t]`` is 0 for base tokens and j + 1 for the j-th thought token.
    Raises:
        ValueError: seq_len < 1 or steps < 0.
    """
    _check_sizes(seq_len, steps)
    anchors = torch.arange(seq_len).repeat(1 + steps)  # (T,)
    depth = torch.arange(1 + steps).repeat_interleave(seq_len)  # (T,)
    return anchors, depth


def thought_attention_mask(seq_len: int, steps: int, *, base_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask of the extended sequence (True = the query may attend the key).

    Base token i attends to base tokens <= i (causal) and to no thought token. Thought token
    (i, j) attends to base tokens <= i and to the thought tokens (i, j') with j' <= j (its own
    thought: itself and earlier), never to another position's thought tokens.

    Args:
        seq_len: L, the base sequence length.
        steps: s, thought tokens per position.
        base_mask: optional (B, L) padding mask of the base tokens (nonzero / True = a real
            token). Keys that are padding (a padded base token and every thought token anchored
            at one) are hidden; a query always still sees itself, so no row is empty.
    Returns:
        (T, T) bool without ``base_mask``; (B, 1, T, T) bool with it (broadcasts over heads, as
        ``torch.nn.functional.scaled_dot_product_attention`` takes it). T = L * (1 + s).
    Raises:
        ValueError: bad sizes, or ``base_mask`` not of shape (B, L).
    """
    anchors, depth = thought_layout(seq_len, steps)
    a_q, a_k = anchors[:, None], anchors[None, :]  # (T, 1), (1, T)
    d_q, d_k = depth[:, None], depth[None, :]
    sees_base = (d_k == 0) & (a_k <= a_q)  # causal prefix of the base tokens, for every query
    sees_own_thought = (d_k > 0) & (a_k == a_q) & (d_k <= d_q)  # empty for base queries (d_q = 0)
    mask = sees_base | sees_own_thought  # (T, T)
    if base_mask is None:
        return mask
    if base_mask.dim() != 2 or base_mask.shape[1] != seq_len:
        raise ValueError(f"base_mask must have shape (B, {seq_len}), got {tuple(base_mask.shape)}")
    key_ok = base_mask.to(torch.bool)[:, anchors.to(base_mask.device)]  # (B, T)
    eye = torch.eye(mask.shape[0], dtype=torch.bool, device=base_mask.device)
    full = (mask.to(base_mask.device)[None] & key_ok[:, None, :]) | eye  # (B, T, T)
    return full[:, None]  # (B, 1, T, T)


def thought_position_ids(seq_len: int, steps: int, *, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the extended sequence: base token i -> i, thought token (i, j) -> i + 1 + j.

    As the reference does (``position_ids += 1`` every thought step), a thought continues the
    positions of its anchor: its first token sits where the next base token would.

    Args:
        seq_len: L, the base sequence length.
        steps: s, thought tokens per position.
        offset: optional integer tensor of shape (...) added to every id of a row, e.g. (B,)
            minus the number of left-padding tokens of each row, or a 0-d start position.
    Returns:
        (T,) long without ``offset``; (..., T) long with it. T = L * (1 + s).
    Raises:
        ValueError: bad sizes, or a floating-point ``offset``.
    """
    anchors, depth = thought_layout(seq_len, steps)
    ids = anchors + depth  # (T,); depth is j + 1 for the j-th thought token
    if offset is None:
        return ids
    if offset.is_floating_point() or offset.is_complex():
        raise ValueError(f"offset must be an integer tensor, got {offset.dtype}")
    return ids.to(offset.device) + offset.long()[..., None]  # (..., T)
