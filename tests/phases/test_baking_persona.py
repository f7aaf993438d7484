"""Prompt Baking of a persona (phases/baking/persona.py): the prompt text, the masked KL against
torch's kl_div, the baking loss's zero/non-zero cases, deterministic sampling, and a tiny bake
that lowers the held-out KL and repeats exactly under the same seed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from phases.baking.persona import (
    DEFAULT_TRAITS,
    bake,
    baking_kl,
    kl_batch,
    persona_prompt,
    sample_continuations,
)
from phases.data import byte_tokenizer
from tests.phases.tiny_cognate import tiny_cognate

QUESTIONS = ["Hi?", "Why sky?", "Name a cat."]
SHORT_TRAITS = {"precision": 0.9}


def test_persona_prompt_golden_and_validation():
    assert persona_prompt(DEFAULT_TRAITS) == ("You are an assistant. Helpfulness: very high (0.9). "
                                              "Creativity: high (0.7). Precision: high (0.8).\n")
    assert persona_prompt({"tone_warmth": 0.4, "risk": 0.1}) == \
        "You are an assistant. Tone warmth: moderate (0.4). Risk: low (0.1).\n"
    with pytest.raises(ValueError, match="creativity"):
        persona_prompt({"helpfulness": 0.9, "creativity": 1.5})
    with pytest.raises(ValueError, match="precision"):
        persona_prompt({"precision": float("nan")})


def test_kl_batch_matches_torch_kl_div_on_the_mask():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    ref = F.kl_div(F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1), log_target=True, reduction="sum") / 3
    assert torch.allclose(kl_batch(t, s, mask), ref, atol=1e-6)
    assert kl_batch(t, t.clone(), mask).abs().item() < 1e-6
    t2, s2 = t.clone(), s.clone()
    i, j = (~mask).nonzero()[0].tolist()
    t2[i, j], s2[i, j] = 100.0 * torch.randn(7, generator=g), float("inf")  # masked out: must not count
    assert kl_batch(t2, s2, mask).item() == kl_batch(t, s, mask).item()
    with pytest.raises(ValueError, match="mask"):
        kl_batch(t, s, mask[:, :4])


def test_baking_kl_zero_without_prompt_positive_with_it_and_differentiable():
    tok, model = byte_tokenizer(), tiny_cognate(0)
    teacher = copy.deepcopy(model).requires_grad_(False)
    examples = [(tok.encode("Hi?"), tok.encode("Hello there")), (tok.encode("Why sky?"), tok.encode("Blue"))]
    for bos in (None, tok.eos_id):
        assert baking_kl(model, teacher, [], examples, bos_id=bos).item() == pytest.approx(0.0, abs=1e-6)
    loss = baking_kl(model, teacher, tok.encode(persona_prompt(SHORT_TRAITS)), examples, bos_id=tok.eos_id)
    assert loss.item() > 1e-6
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_baking_kl_padding_does_not_change_an_example():
    tok, model = byte_tokenizer(), tiny_cognate(1)
    teacher = copy.deepcopy(model).requires_grad_(False)
    prompt = tok.encode("Be kind.\n")
    a, b = (tok.encode("Q"), tok.encode("abc")), (tok.encode("Longer q"), tok.encode("xyzuvw"))
    alone = baking_kl(model, teacher, prompt, [a]).item()
    together = baking_kl(model, teacher, prompt, [a, b]).item() * 2 - baking_kl(model, teacher, prompt, [b]).item()
    assert together == pytest.approx(alone, rel=1e-4, abs=1e-6)


def test_sample_continuations_deterministic_under_the_seed():
    tok, model = byte_tokenizer(), tiny_cognate(0)
    prompt, qs = tok.encode("Be kind.\n"), [tok.encode(q) for q in QUESTIONS[:2]]
    kw = {"n_samples": 3, "length": 5, "temperature": 1.0, "bos_id": tok.eos_id}
    a = sample_continuations(model, prompt, qs, seed=1, **kw)
    assert len(a) == 6 and all(len(y) == 5 for y in a)
    assert a == sample_continuations(model, prompt, qs, seed=1, **kw)
    assert a != sample_continuations(model, prompt, qs, seed=2, **kw)
    assert not model.training


def test_bake_lowers_held_out_kl_and_is_reproducible():
    torch.set_num_threads(1)
    tok = byte_tokenizer()
    kw = {"traits": SHORT_TRAITS, "questions": QUESTIONS, "n_samples": 2, "length": 12, "steps": 30, "lr": 3e-4,
              "batch_size": 3, "seed": 0}
    m1, m2 = tiny_cognate(0), tiny_cognate(0)
    r1, r2 = bake(m1, tok, **kw), bake(m2, tok, **kw)
    print(f"kl_before={r1.kl_before:.6g} kl_after={r1.kl_after:.6g} factor={r1.reduction_factor:.3g}")
    assert r1.kl_after < r1.kl_before and r1.reduction_factor > 1.0
    assert r1.steps == 30 and len(r1.losses) == 30
    assert (r1.kl_before, r1.kl_after, r1.losses) == (r2.kl_before, r2.kl_after, r2.losses)
    assert torch.equal(m1.lm_head.weight, m2.lm_head.weight)
    assert not torch.equal(m1.lm_head.weight, tiny_cognate(0).lm_head.weight)
