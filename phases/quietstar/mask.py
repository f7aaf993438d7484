"""Attention mask and position ids for thoughts generated in parallel without a KV cache
(Quiet-STaR, Zelikman et al. 2024, arXiv 2403.09629, section 4.2).

The reference (ezelikman/quiet-star, ``modeling_mistral.py``) runs one forward per thought step
over the whole sequence with a KV cache, extending the mask each step with ``eye(L)``: query
position i sees the causal prefix <= i plus only its OWN earlier thought tokens. Here the same
attention pattern is written out over one extended sequence, so that a plain forward (no cache)
over all tokens computes the same thing.

A thought is a *chain* of tokens anchored at a base position. ``anchors`` lists the C chains'
base positions: by default one chain per position (0 .. L-1, the paper); a subset of positions
(thoughts only where they are needed); or a position repeated (several thoughts of the same
position share the base tokens of one sequence). For a base sequence of length L after s steps
the extended sequence has T = L + s * C tokens:

    [ base 0 .. L-1 | token 0 of chains 0 .. C-1 | ... | token s-1 of chains 0 .. C-1 ]

so index ``L + j * C + c`` is the j-th token (0-based) of chain c. ``anchors`` may be (C,) (the
same for every row) or (B, C) (per row).
"""

from __future__ import annotations

import torch

__all__ = ["thought_layout", "thought_attention_mask", "thought_position_ids", "chain_index"]


def _chains(seq_len: int, steps: int, anchors: torch.Tensor | None) -> torch.Tensor:
    """Validate the sizes and return the chains' anchors as a long (C,) or (B, C) tensor."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if anchors is None:
        return torch.arange(seq_len)
    if not isinstance(anchors, torch.Tensor) or anchors.dim() not in (1, 2) or anchors.is_floating_point() \
            or anchors.is_complex() or anchors.dtype == torch.bool:
        kind = (f"{anchors.dtype} tensor of shape {tuple(anchors.shape)}" if isinstance(anchors, torch.Tensor)
                else type(anchors).__name__)
        raise ValueError(f"anchors must be an integer tensor of shape (C,) or (B, C), got a {kind}")
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= seq_len):
        raise ValueError(f"anchors must be base positions in [0, {seq_len}), got values in "
                         f"[{int(anchors.min())}, {int(anchors.max())}]")
    return anchors.long()


def chain_index(seq_len: int, steps: int, n_chains: int) -> torch.Tensor:
    """Index of every chain token in the extended sequence: (steps, C), ``L + j * C + c``."""
    return seq_len + torch.arange(steps)[:, None] * n_chains + torch.arange(n_chains)[None, :]


def thought_layout(seq_len: int, steps: int, *, anchors: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which base position and which depth every token of the extended sequence has.

    Args:
        seq_len: L, the base sequence length.
        steps: s, tokens per chain so far.
        anchors: the chains' base positions, (C,) or (B, C); None = every position (C = L).
    Returns:
        ``(token_anchors, depth)``: token_anchors (T,) or (B, T) long (i for base token i, the
        chain's anchor for every chain token); depth (T,) long, 0 for base tokens and j + 1 for
        the j-th chain token. T = L + s * C.
    Raises:
        ValueError: seq_len < 1, steps < 0, or anchors not integer positions in [0, L).
    """
    chains = _chains(seq_len, steps, anchors)
    base = torch.arange(seq_len, device=chains.device).expand(*chains.shape[:-1], seq_len)
    token_anchors = torch.cat([base, chains.repeat(*([1] * (chains.dim() - 1)), steps)], dim=-1)
    depth = torch.cat([torch.zeros(seq_len, dtype=torch.long),
                       torch.arange(1, steps + 1).repeat_interleave(chains.shape[-1])]).to(chains.device)
    return token_anchors, depth


def thought_attention_mask(seq_len: int, steps: int, *, anchors: torch.Tensor | None = None,
                           base_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask of the extended sequence (True = the query may attend the key).

    Base token i attends to base tokens <= i (causal) and to no chain token. Token j of chain c
    (anchored at a) attends to base tokens <= a and to the tokens j' <= j of chain c (itself and
    earlier), never to another chain's tokens, even one anchored at the same position.

    Args:
        seq_len: L, the base sequence length.
        steps: s, tokens per chain.
        anchors: the chains' base positions, (C,) or (B, C); None = every position.
        base_mask: optional (B, L) padding mask of the base tokens (nonzero / True = a real
            token). Keys that are padding (a padded base token and every chain token anchored
            at one) are hidden; a query always still sees itself, so no row is empty.
    Returns:
        (T, T) bool when neither ``base_mask`` nor (B, C) anchors are given; else (B, 1, T, T)
        bool (broadcasts over heads, as ``torch.nn.functional.scaled_dot_product_attention``
        takes it). T = L + s * C.
    Raises:
        ValueError: bad sizes or anchors, ``base_mask`` not (B, L), or a batch size mismatch.
    """
    chains = _chains(seq_len, steps, anchors)
    n_chains = chains.shape[-1]
    token_anchors, depth = thought_layout(seq_len, steps, anchors=chains)
    chain = torch.cat([torch.full((seq_len,), -1), torch.arange(n_chains).repeat(steps)]).to(chains.device)  # (T,)
    a_q, a_k = token_anchors[..., :, None], token_anchors[..., None, :]  # (..., T, 1), (..., 1, T)
    d_q, d_k = depth[:, None], depth[None, :]
    c_q, c_k = chain[:, None], chain[None, :]
    sees_base = (d_k == 0) & (a_k <= a_q)  # the causal prefix of the query's anchor
    sees_own_chain = (d_k > 0) & (c_k == c_q) & (d_k <= d_q)  # empty for base queries (chain -1 vs >= 0)
    mask = sees_base | sees_own_chain  # (T, T) or (B, T, T)
    if base_mask is None:
        return mask if mask.dim() == 2 else mask[:, None]
    if base_mask.dim() != 2 or base_mask.shape[1] != seq_len:
        raise ValueError(f"base_mask must have shape (B, {seq_len}), got {tuple(base_mask.shape)}")
    if chains.dim() == 2 and chains.shape[0] != base_mask.shape[0]:
        raise ValueError(f"anchors has {chains.shape[0]} rows but base_mask has {base_mask.shape[0]}")
    real = base_mask.to(torch.bool)
    key_ok = real.gather(1, token_anchors.to(real.device).expand(real.shape[0], -1))  # (B, T)
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=real.device)
    full = (mask.to(real.device) & key_ok[:, None, :]) | eye  # (B, T, T)
    return full[:, None]  # (B, 1, T, T)


def thought_position_ids(seq_len: int, steps: int, *, anchors: torch.Tensor | None = None,
                         offset: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the extended sequence: base token i -> i, token j of a chain anchored at
    a -> a + 1 + j.

    As the reference does (``position_ids += 1`` every thought step), a chain continues the
    positions of its anchor: its first token sits where the next base token would.

    Args:
        seq_len: L, the base sequence length.
        steps: s, tokens per chain.
        anchors: the chains' base positions, (C,) or (B, C); None = every position.
        offset: optional integer tensor of shape (...) added to every id of a row, e.g. (B,)
            minus the number of left-padding tokens of each row, or a 0-d start position.
    Returns:
        (T,) long, or (B, T) with (B, C) anchors; with ``offset`` its shape (...) is prepended
        (broadcast with the anchors' batch dim). T = L + s * C.
    Raises:
        ValueError: bad sizes or anchors, or a floating-point ``offset``.
    """
    token_anchors, depth = thought_layout(seq_len, steps, anchors=anchors)
    ids = token_anchors + depth  # depth is j + 1 for the j-th chain token
    if offset is None:
        return ids
    if offset.is_floating_point() or offset.is_complex():
        raise ValueError(f"offset must be an integer tensor, got {offset.dtype}")
    return ids.to(offset.device) + offset.long()[..., None]
