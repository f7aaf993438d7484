"""Prompt Baking of a persona (phases/baking/persona.py): the prompt text, the masked KL against
torch's kl_div, the baking loss's zero/non-zero cases, deterministic sampling, and a tiny bake
that lowers the held-out KL and repeats exactly under the same seed, with a full fine-tune and with LoRA."""

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
    assert persona_prompt(DEFAULT_TRAITS) == ("You are an assistant. Creativity: high (0.7). "
                                              "Helpfulness: very high (0.9). Precision: high (0.8).\n")
    assert persona_prompt({"tone_warmth": 0.4, "risk": 0.1}) == persona_prompt({"risk": 0.1, "tone_warmth": 0.4}) \
        == "You are an assistant. Risk: low (0.1). Tone warmth: moderate (0.4).\n"  # name order, not the mapping's
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
    assert r1.model is m1 and r2.model is m2  # the full fine-tune bakes in place
    print(f"kl_before={r1.kl_before:.6g} kl_after={r1.kl_after:.6g} factor={r1.reduction_factor:.3g}")
    assert r1.kl_after < r1.kl_before and r1.reduction_factor > 1.0
    assert r1.steps == 30 and len(r1.losses) == 30
    assert (r1.kl_before, r1.kl_after, r1.losses) == (r2.kl_before, r2.kl_after, r2.losses)
    assert torch.equal(m1.lm_head.weight, m2.lm_head.weight)
    assert not torch.equal(m1.lm_head.weight, tiny_cognate(0).lm_head.weight)


def test_bake_with_lora_lowers_held_out_kl_returns_a_plain_model_and_is_reproducible():
    torch.set_num_threads(1)
    tok = byte_tokenizer()
    kw = {"traits": SHORT_TRAITS, "questions": QUESTIONS, "n_samples": 2, "length": 12, "steps": 30, "lr": 1e-2,
          "batch_size": 3, "seed": 0, "method": "lora", "lora_rank": 4}
    m1, m2, ref = tiny_cognate(0), tiny_cognate(0), tiny_cognate(0)
    r1, r2 = bake(m1, tok, **kw), bake(m2, tok, **kw)
    b1, b2 = r1.model, r2.model
    assert b1 is m1  # peft injected the adapters into m1 and merged them there
    print(f"lora kl_before={r1.kl_before:.6g} kl_after={r1.kl_after:.6g} factor={r1.reduction_factor:.3g}")
    assert r1.kl_after < r1.kl_before and len(r1.losses) == 30
    assert (r1.kl_before, r1.kl_after, r1.losses) == (r2.kl_before, r2.kl_after, r2.losses)
    assert type(b1) is type(ref) and not any(type(m).__module__.startswith("peft") for m in b1.modules())
    assert [n for n, _ in b1.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(p.requires_grad for p in b1.parameters()) and not b1.training
    changed = {n for (n, p), q in zip(b1.named_parameters(), ref.parameters()) if not torch.equal(p, q)}
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           and ".attn." in n for n in changed)  # only the adapted matrices moved (merged)
    assert all(torch.equal(p, q) for p, q in zip(b1.parameters(), b2.parameters()))
    # Zero steps: LoRA's B starts at zero, so merging changes nothing and the KL stays put.
    r0 = bake(tiny_cognate(0), tok, **{**kw, "steps": 0})
    b0 = r0.model
    assert r0.kl_after == pytest.approx(r0.kl_before, rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(b0.parameters(), ref.parameters()))


def test_bake_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown bake method 'qlora'; valid methods: full, lora"):
        bake(tiny_cognate(0), byte_tokenizer(), questions=QUESTIONS, method="qlora")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bake_trains_a_bitnet_model_through_its_straight_through_path(method):
    """BitLinear's eval forward (the packed arithmetic) has no gradient: bake runs those layers in train mode."""
    from phases.bitnet.quant import BitLinear, replace_linears

    torch.set_num_threads(1)
    model = tiny_cognate(0, sub_norm=True)
    replace_linears(model)
    n_bit = sum(isinstance(m, BitLinear) for m in model.modules())
    r = bake(model, byte_tokenizer(), traits=SHORT_TRAITS, questions=QUESTIONS[:2], n_samples=2, length=8, steps=8,
             lr=1e-2, batch_size=2, method=method, lora_rank=4)
    print(f"{method}: kl_before={r.kl_before:.6g} kl_after={r.kl_after:.6g}")
    assert r.kl_after < r.kl_before
    layers = [m for m in r.model.modules() if isinstance(m, BitLinear)]
    assert n_bit > 0 and len(layers) == n_bit and not any(m.training for m in layers)
