"""The persona trait score (phases/baking/traits.py): reproducible, moved by training on self-descriptions,
computed as the documented per-token log-likelihood difference, and the gap-closed arithmetic of the report."""

from __future__ import annotations

import math

import pytest
import torch

from phases.baking.persona import DEFAULT_TRAITS, persona_prompt
from phases.baking.tooldata import finetune_texts
from phases.baking.traits import TEMPLATES, TRAIT_WORDS, gap_closed, persona_report, score, trait_scores
from phases.data import byte_tokenizer
from tests.phases.tiny_cognate import tiny_cognate

TOK = byte_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mean_logp(model, context: str, word: str) -> float:
    """Reference: the word's mean token log-probability from an unpadded single-row forward."""
    ctx, w = [TOK.eos_id] + TOK.encode(context), TOK.encode(word)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ctx + w])).logits[0].double().log_softmax(-1)  # (T, V)
    return sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(w)) / len(w)


def test_every_default_trait_has_words_and_the_score_is_deterministic():
    assert set(DEFAULT_TRAITS) == set(TRAIT_WORDS)
    model = tiny_cognate(0)
    a = trait_scores(model, TOK, DEFAULT_TRAITS)
    assert a == trait_scores(model, TOK, DEFAULT_TRAITS) and set(a) == set(DEFAULT_TRAITS)
    assert all(math.isfinite(v) for v in a.values())
    assert trait_scores(tiny_cognate(1), TOK, DEFAULT_TRAITS) != a
    assert trait_scores(model, TOK, ["precision"], prefix_text="You are precise.\n")["precision"] != a["precision"]
    with pytest.raises(ValueError, match="scored traits: helpfulness, creativity, precision"):
        score(model, TOK, "humour")


def test_score_equals_an_unbatched_reference():
    model = tiny_cognate(2)
    prefix = "Be exact.\n"
    diffs = [_mean_logp(model, prefix + t.split("{w}")[0], pos) - _mean_logp(model, prefix + t.split("{w}")[0], neg)
             for t in TEMPLATES for pos, neg in TRAIT_WORDS["precision"]]
    expected = sum(diffs) / len(diffs)
    assert score(model, TOK, "precision", TOK.encode(prefix)) == pytest.approx(expected, abs=1e-5)


def test_training_on_helpful_self_descriptions_raises_helpfulness():
    model = tiny_cognate(0)
    before = trait_scores(model, TOK, DEFAULT_TRAITS)
    texts = [t.format(w=pos) + "\n" for t in TEMPLATES for pos, _ in TRAIT_WORDS["helpfulness"]]
    finetune_texts(model, TOK, texts, steps=30, lr=1e-2, batch_size=6, seed=0)
    after = trait_scores(model, TOK, DEFAULT_TRAITS)
    print(f"helpfulness {before['helpfulness']:.3f} -> {after['helpfulness']:.3f}")
    assert after["helpfulness"] > before["helpfulness"] + 0.5


def test_gap_closed_arithmetic_and_the_report():
    assert gap_closed(1.0, 3.0, 2.0) == 0.5
    assert gap_closed(1.0, 3.0, 3.0) == 1.0 and gap_closed(1.0, 3.0, 0.0) == -0.5
    assert gap_closed(1.0, 1.0 + 1e-7, 5.0) is None
    base, baked = tiny_cognate(0), tiny_cognate(0)
    finetune_texts(baked, TOK, ["I am precise.\n", "My answers are exact.\n"], steps=5, lr=3e-3, batch_size=2, seed=0)
    traits = {"precision": 0.8, "creativity": 0.7}
    report = persona_report(base, baked, TOK, traits)
    assert set(report) == set(traits)
    prompted = trait_scores(base, TOK, traits, prefix_text=persona_prompt(traits))
    for t, row in report.items():
        assert row["base"] == trait_scores(base, TOK, [t])[t] and row["prompted"] == prompted[t]
        assert row["baked"] == trait_scores(baked, TOK, [t])[t]
        assert row["gap_closed"] == pytest.approx((row["baked"] - row["base"]) / (row["prompted"] - row["base"]))
    same = persona_report(base, base, TOK, traits)
    assert all(row["gap_closed"] == 0.0 for row in same.values())
    with pytest.raises(ValueError, match="humour"):
        persona_report(base, baked, TOK, {"humour": 0.5})
