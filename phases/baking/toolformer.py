"""Toolformer's filter: keep a tool call only if its result makes the following text easier to predict.

Schick et al. 2023, "Toolformer: Language Models Can Teach Themselves to Use Tools" (arXiv 2302.04761),
section 2. For a call c inserted at position i of a text x, with the following tokens x_i, x_{i+1}, ...,
the weighted loss of the model M given a prefix z is

    L_i(z) = - sum_j w_{j-i} log p_M(x_j | z, x_{1:j-1}),
    w_t = w~_t / sum_s w~_s,   w~_t = max(0, 1 - 0.2 t),

so only the first five following tokens count, the nearest most. With
L_plain = L_i(no call), L_no_result = L_i(call without its result) and L_with = L_i(call with result),
the call is kept iff

    min(L_plain, L_no_result) - L_with >= tau_f,

i.e. the result (not merely the call) lowers the loss by at least tau_f; the paper uses tau_f = 1.0.

Differences from the paper, both from our call format (``phases/baking/tools.py``): the call without its
result is ``<tool>name(arg)</tool>`` (the paper's ``<API> name(arg) -> </API>`` keeps an empty result
after the arrow), and the result follows the call as ``" -> result"``. A continuation shorter than five tokens
has its weights normalised over its own length (``weights(n)``); from five tokens on this is the
paper's normalisation. Texts are encoded part by part and the ids concatenated (as
``phases/data/tasks.encode_task`` does), so the boundary between the call and the text after it is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tools import format_result

__all__ = ["FilterDecision", "weights", "weighted_loss", "keep_call", "filter_calls"]

_WINDOW = 5  # w~_t = max(0, 1 - 0.2 t) is zero from t = 5 on


@dataclass(frozen=True)
class FilterDecision:
    """The three weighted losses of one candidate call, the gain ``min(plain, no_result) - with_result``,
    and whether the call is kept (``gain >= threshold``)."""

    loss_plain: float
    loss_no_result: float
    loss_with_result: float
    gain: float
    keep: bool


def weights(n: int) -> torch.Tensor:
    """Toolformer's weights ``w_t = max(0, 1 - 0.2 t)`` for ``t = 0..n-1``, normalised to sum 1 (float64).

    Raises:
        ValueError: if ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"weights needs n >= 1, got {n}")
    w = (1.0 - 0.2 * torch.arange(n, dtype=torch.float64)).clamp(min=0.0)  # 1 - 0.2 * 5 == 0.0 exactly
    return w / w.sum()


def weighted_loss(model: torch.nn.Module, prefix_ids: Sequence[int], continuation_ids: Sequence[int]) -> float:
    """``L = - sum_t w_t log p(continuation_t | prefix, continuation_<t)`` from one forward in eval mode.

    Tokens past the fifth have weight 0, so only the first five continuation tokens are fed.

    Args:
        model: a causal LM whose ``model(input_ids=...)`` returns ``.logits`` (B, T, V).
        prefix_ids: the context (non-empty: the first continuation token needs a position predicting it).
        continuation_ids: the scored tokens (non-empty).
    Returns:
        The weighted negative log-likelihood, accumulated in float64.
    Raises:
        ValueError: if either id list is empty.
    """
    if not prefix_ids or not continuation_ids:
        raise ValueError(f"weighted_loss needs non-empty prefix and continuation ids, got lengths "
                         f"{len(prefix_ids)} and {len(continuation_ids)}")
    cont = list(continuation_ids)[:_WINDOW]
    param = next(iter(model.parameters()), None)
    x = torch.tensor([list(prefix_ids) + cont], dtype=torch.long,
                     device=param.device if param is not None else None)  # (1, T)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits[0]  # (T, V)
    finally:
        model.train(was_training)
    start = len(prefix_ids) - 1  # logits at position p predict the token at p + 1
    logp = logits[start:start + len(cont)].double().log_softmax(-1)  # (n, V)
    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
    token_logp = logp.gather(-1, target[:, None])[:, 0]  # (n,)
    return float(-(weights(len(cont)).to(logp.device) * token_logp).sum())


def keep_call(model: torch.nn.Module, tokenizer: Any, text_before: str, call: str, result: str, text_after: str, *,
              threshold: float = 1.0) -> FilterDecision:
    """Toolformer's filtering decision for one call inserted between ``text_before`` and ``text_after``.

    Args:
        model: a causal LM (see :func:`weighted_loss`).
        tokenizer: ``encode(str) -> list[int]``; its ``eos_id`` (when present) starts every context, as in
            our training rows.
        text_before: the text up to the call.
        call: the call text, e.g. ``format_call("calculator", "12*7")``.
        result: the tool's result; the call with result is ``call + " -> " + result``.
        text_after: the text the call should help predict.
        threshold: tau_f; the call is kept iff ``min(L_plain, L_no_result) - L_with >= threshold``.
    Returns:
        The :class:`FilterDecision`.
    Raises:
        ValueError: if ``text_after`` encodes to no tokens, or the context is empty.
    """
    eos = getattr(tokenizer, "eos_id", None)
    before = ([eos] if eos is not None else []) + tokenizer.encode(text_before)
    call_ids, result_ids = tokenizer.encode(call), tokenizer.encode(format_result(result))
    after = tokenizer.encode(text_after)
    plain = weighted_loss(model, before, after)
    no_result = weighted_loss(model, before + call_ids, after)
    with_result = weighted_loss(model, before + call_ids + result_ids, after)
    gain = min(plain, no_result) - with_result
    return FilterDecision(plain, no_result, with_result, gain, gain >= threshold)


def filter_calls(model: torch.nn.Module, tokenizer: Any, candidates: Sequence[tuple[str, str, str, str]], *,
                 threshold: float = 1.0) -> list[FilterDecision]:
    """:func:`keep_call` for each ``(text_before, call, result, text_after)`` in ``candidates``, in order."""
    return [keep_call(model, tokenizer, *candidate, threshold=threshold) for candidate in candidates]
