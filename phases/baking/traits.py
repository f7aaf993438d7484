"""A reproducible persona trait score: how much more likely the model is to describe itself with a trait word
than with its antonym. Used to check what Prompt Baking (``persona.py``; Bhargava et al. 2024, arXiv 2409.13697)
carried from the prompted model into the baked one.

What it measures. For a trait (``persona.DEFAULT_TRAITS``: helpfulness, creativity, precision) there is a fixed
list of (positive, negative) word pairs (helpful/unhelpful, useful/useless, ...) and fixed self-description
templates ("I am {w}.", "My answers are {w}.", ...). With t the template's text before ``{w}`` and an optional
prefix (the persona prompt), the score is

    score = mean over templates x pairs of [ mean_k log p(pos_k | eos, prefix, t, pos_<k)
                                           - mean_k log p(neg_k | eos, prefix, t, neg_<k) ],

teacher-forced, in nats per token (the mean over each word's tokens: with a byte tokenizer "unhelpful" has two
more tokens than "helpful", and a sum would penalise the longer word). Positive: the model prefers the trait word.

Limits. It is a log-likelihood preference of a language model, not a human judgement of behaviour: it says which
word the model would rather continue a self-description with, not whether its answers are helpful, creative or
precise. Word pairs and templates are few and fixed, so the score is reproducible but narrow; a model can move it
by memorising a word. Antonyms built by prefixing ("un-") share their stem with the positive word, and the
per-token mean mixes the prefix's cost with the cheap stem. Only differences between models or prompts on the
same word lists mean something (base vs prompted vs baked in :func:`persona_report`); the absolute value of one
model's score does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .persona import persona_prompt

__all__ = ["TRAIT_WORDS", "TEMPLATES", "score", "trait_scores", "gap_closed", "persona_report"]

# (positive, negative) word pairs per trait of persona.DEFAULT_TRAITS.
TRAIT_WORDS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "helpfulness": (("helpful", "unhelpful"), ("useful", "useless"), ("supportive", "dismissive")),
    "creativity": (("creative", "dull"), ("imaginative", "boring"), ("original", "predictable")),
    "precision": (("precise", "vague"), ("exact", "sloppy"), ("accurate", "careless")),
}
# Self-descriptions; the word goes in place of {w}, and only the text before it conditions the word.
TEMPLATES: tuple[str, ...] = ("I am {w}.", "My answers are {w}.", "People say that I am {w}.",
                              "As an assistant, I am {w}.")


def _words(trait: str) -> tuple[tuple[str, str], ...]:
    try:
        return TRAIT_WORDS[trait]
    except KeyError:
        raise ValueError(f"no word list for trait {trait!r}; scored traits: {', '.join(TRAIT_WORDS)}") from None


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer: Any, trait: str, prefix_ids: Sequence[int] | None = None) -> float:
    """The trait score (see the module docstring) from one batched teacher-forced forward, in eval mode (restored).

    Args:
        model: a causal LM, ``model(input_ids=...).logits`` (B, T, V).
        tokenizer: ``encode``, ``eos_id``.
        trait: a key of :data:`TRAIT_WORDS`.
        prefix_ids: ids put between eos and the template (e.g. the encoded persona prompt).
    Returns:
        Mean over templates x pairs of (mean log p of the positive word's tokens - the negative's), nats per token.
    Raises:
        ValueError: a trait without a word list (names the scored ones).
    """
    pairs = _words(trait)
    context0 = [tokenizer.eos_id] + [int(t) for t in (prefix_ids or [])]
    rows, spans = [], []  # spans: (start, end) of the word's tokens in each row
    for template in TEMPLATES:
        context = context0 + tokenizer.encode(template.split("{w}")[0])
        for pos, neg in pairs:
            for word in (pos, neg):
                w = tokenizer.encode(word)
                rows.append(context + w)
                spans.append((len(context), len(context) + len(w)))
    width = max(map(len, rows))
    x = torch.full((len(rows), width), tokenizer.eos_id, dtype=torch.long)  # (N, T), right-padded
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.tensor(row)
    was_training = model.training
    model.eval()
    try:
        logp = model(input_ids=x.to(next(model.parameters()).device)).logits.double().log_softmax(-1).cpu()
    finally:
        model.train(was_training)
    per_word = []
    for i, (start, end) in enumerate(spans):  # logits at p predict the token at p + 1
        target = x[i, start:end]
        per_word.append(float(logp[i, start - 1:end - 1].gather(-1, target[:, None]).mean()))
    diffs = [per_word[k] - per_word[k + 1] for k in range(0, len(per_word), 2)]
    return sum(diffs) / len(diffs)


def trait_scores(model: torch.nn.Module, tokenizer: Any, traits: Sequence[str] | Mapping[str, float], *,
                 prefix_text: str | None = None) -> dict[str, float]:
    """:func:`score` of every trait (the names, when a persona mapping is given), with ``prefix_text`` encoded
    as the prefix."""
    prefix = tokenizer.encode(prefix_text) if prefix_text else None
    return {t: score(model, tokenizer, t, prefix) for t in traits}


def gap_closed(base: float, prompted: float, baked: float) -> float | None:
    """``(baked - base) / (prompted - base)``: the share of the prompt's effect the baked model shows without the
    prompt (1 = all of it, 0 = none, negative = the other way); None when ``|prompted - base| < 1e-6``."""
    gap = prompted - base
    return None if abs(gap) < 1e-6 else (baked - base) / gap


def persona_report(base_model: torch.nn.Module, baked_model: torch.nn.Module, tokenizer: Any,
                   traits: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """Per trait: ``base`` (base model, no prompt), ``prompted`` (base model with ``persona_prompt(traits)``, the
    target of baking), ``baked`` (baked model, no prompt) and ``gap_closed`` (see :func:`gap_closed`).

    Raises:
        ValueError: a trait without a word list (and see ``persona.persona_prompt``).
    """
    for t in traits:
        _words(t)
    base = trait_scores(base_model, tokenizer, traits)
    prompted = trait_scores(base_model, tokenizer, traits, prefix_text=persona_prompt(traits))
    baked = trait_scores(baked_model, tokenizer, traits)
    return {t: {"base": base[t], "prompted": prompted[t], "baked": baked[t],
                "gap_closed": gap_closed(base[t], prompted[t], baked[t])} for t in traits}
