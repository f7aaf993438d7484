"""Quiet-STaR over real models (phases/quietstar/model.py, coherence.py, evaluate.py): chains on
the extended sequence compute exactly what a plain forward of their own text computes, on a
Cognate model, an HF Llama and an HF GPT-2; no chain sees another (gradients); the mixing head at its
initial value gives the base model bit for bit; delimiters never appear inside a thought;
hard injection; coherence scores and the filter; save/load; generation with thoughts."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from coordinator.errors import ArtifactError
from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig
from phases.data import byte_tokenizer
from phases.quietstar.coherence import coherence_scores
from phases.quietstar.config import QuietStarConfig
from phases.quietstar.evaluate import heldout_losses, multistep_arithmetic
from phases.quietstar.mask import chain_index, thought_attention_mask
from phases.quietstar.model import ThoughtModel, add_thought_tokens, load_thought_model, save_thought_model

VOCAB = 258


def _cognate(memory: bool = False) -> CognateForCausalLM:
    torch.manual_seed(0)
    return CognateForCausalLM(CognateModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, memory_enabled=memory,
                                                 memory_slots=16, memory_chunk_size=8)).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def _thought_model(lm, **cfg) -> tuple[ThoughtModel, object]:
    tok = byte_tokenizer().to_hf()
    qcfg = QuietStarConfig(**{"thought_length": 3, "n_thoughts": 2, "n_true": 2, **cfg})
    start, end = add_thought_tokens(lm, tok, qcfg)
    return ThoughtModel(lm, qcfg, start_id=start, end_id=end), tok


def _ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)).eval()


MODELS = {"cognate": _cognate, "llama": _llama, "gpt2": _gpt2}  # rotary and learned absolute positions


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_chain_computes_what_a_plain_forward_of_its_own_text_computes(kind):
    """Chain c anchored at a, with tokens t_0..t_{s-1}: its hidden states on the extended sequence
    equal those of the plain causal sequence x_0..x_a, t_0..t_{s-1} (positions a+1..a+s). Two
    chains at the same position with different tokens must not see each other."""
    tm, _ = _thought_model(MODELS[kind]())
    L, steps = 7, 3
    x = _ids(2, L)
    anchors = torch.tensor([[1, 4, 4, 6], [0, 2, 5, 5]])  # per row; 4 and 5 repeated
    n_chains = anchors.shape[1]
    chain_tok = _ids(2, steps * n_chains, seed=1)  # (B, steps * C), step-major
    embeds = tm._embed(torch.cat([x, chain_tok], dim=1))
    with torch.no_grad():
        hidden = tm._hidden(embeds, L, steps, anchors)
        where = chain_index(L, steps, n_chains)
        for b in range(2):
            for c in range(n_chains):
                a = int(anchors[b, c])
                toks = chain_tok[b].reshape(steps, n_chains)[:, c]
                text = torch.cat([x[b, :a + 1], toks])[None]
                ref = tm.lm.base_model(input_ids=text)
                ref = ref[0] if isinstance(ref, tuple) else ref.last_hidden_state
                torch.testing.assert_close(hidden[b, where[:, c]], ref[0, a + 1:], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(hidden[b, :a + 1], ref[0, :a + 1], atol=1e-5, rtol=1e-5)


def test_no_chain_receives_gradient_from_another_chain():
    """On a Cognate model with memory: the outputs of one chain depend on its anchor's causal
    prefix and its own tokens only, never on another chain's tokens (also one at the same anchor)."""
    tm, _ = _thought_model(_cognate(memory=True))
    L, steps = 9, 3
    anchors = torch.tensor([[2, 2, 5, 8]])
    embeds = tm._embed(torch.cat([_ids(1, L), _ids(1, steps * 4, seed=2)], dim=1)).detach().requires_grad_(True)
    hidden = tm._hidden(embeds, L, steps, anchors)
    where = chain_index(L, steps, 4)
    c = 1  # the second chain at position 2
    hidden[0, where[:, c]].sum().backward()
    grad = embeds.grad[0].abs().sum(-1)  # (T,)
    assert grad[:3].gt(0).all(), "the anchor's causal prefix must matter"
    assert grad[3:L].eq(0).all(), "base tokens after the anchor must not matter"
    for other in range(4):
        expect_zero = other != c
        assert grad[where[:, other]].eq(0).all() == expect_zero, other


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mixing_head_at_init_gives_the_base_model_exactly(kind):
    lm = MODELS[kind]()
    tm, _ = _thought_model(lm)
    x = _ids(2, 10)
    with torch.no_grad():
        base = lm(input_ids=x).logits
        mixed, thoughts, anchors = tm.think(x)
    assert thoughts.shape == (2, 10, 3) and anchors.shape == (2, 10)
    assert torch.equal(mixed[..., :VOCAB], base[..., :VOCAB])  # bit for bit: w = 0
    assert torch.isinf(mixed[..., [tm.start_id, tm.end_id]]).all()  # delimiters never predicted


def test_delimiters_never_appear_inside_a_thought_even_when_most_likely():
    tm, _ = _thought_model(_cognate(), thought_length=5)
    with torch.no_grad():  # make the delimiters by far the most likely next tokens
        tm.lm.lm_head.weight[[tm.start_id, tm.end_id]] = tm.lm.lm_head.weight[:VOCAB].abs().sum(0) * 50
    rollout = tm.loss(_ids(3, 12), generator=torch.Generator().manual_seed(0))
    assert rollout.thoughts.numel() > 0
    assert not torch.isin(rollout.thoughts, torch.tensor([tm.start_id, tm.end_id])).any()


def test_training_forward_parts_and_gradients():
    tm, _ = _thought_model(_cognate(memory=True), n_thoughts=3, n_true=3)
    tm.train()
    x = _ids(2, 12)
    r = tm.loss(x, generator=torch.Generator().manual_seed(0))
    n_pos = 12 - 3
    assert r.anchors.shape == (2, n_pos) and r.thoughts.shape == (2, 3, n_pos, 3)
    assert r.rewards.shape == r.keep.shape == (2, 3, n_pos) and r.keep.all()
    # w = 0 at the start: the mixed prediction is the base one, so every reward is 0 ...
    assert r.rewards.abs().max() < 1e-5 and r.mixing_weight.abs().max() == 0
    assert r.parts["talk_nll"] == pytest.approx(float(r.parts["base_nll"]), abs=0.5)
    r.loss.backward()
    # ... but the mixing head's last layer already has a gradient (it learns w), as does the LM;
    # the thought (delimiters included) cannot matter yet: it is multiplied by w = 0.
    assert tm.mixing.mlp[-1].weight.grad.abs().sum() > 0
    assert tm.lm.lm_head.weight.grad.abs().sum() > 0
    assert tm.start_embedding.grad.abs().sum() == 0
    with torch.no_grad():  # once w != 0, thoughts change the prediction and earn rewards
        tm.mixing.mlp[-1].bias.fill_(0.5)
    tm.zero_grad()
    r2 = tm.loss(x, generator=torch.Generator().manual_seed(0))
    assert r2.rewards.abs().max() > 1e-4
    r2.loss.backward()
    assert tm.start_embedding.grad.abs().sum() > 0 and tm.end_embedding.grad.abs().sum() > 0
    adv_sum = (r2.rewards - r2.rewards.mean(dim=1, keepdim=True)).sum(dim=1)
    assert adv_sum.abs().max() < 1e-5


def test_hard_injection_thinks_only_at_the_highest_loss_positions():
    tm, _ = _thought_model(_cognate(), injection="hard", hard_fraction=0.25, n_true=2)
    x = _ids(2, 18)
    with torch.no_grad():
        logits = tm.lm(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    r = tm.loss(x, generator=torch.Generator().manual_seed(0))
    usable = 18 - 2
    assert r.anchors.shape == (2, round(0.25 * usable))
    for b in range(2):
        expect = nll[b, :usable].topk(r.anchors.shape[1]).indices.sort().values
        assert r.anchors[b].tolist() == expect.tolist()


def test_coherence_scores_follow_their_definitions():
    embed = torch.eye(4)  # token i -> unit vector e_i
    thought = torch.tensor([[0, 0], [1, 2]])
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.1, 1.0]]))
    context = torch.tensor([[0, 0, 0], [3, 3, 3]])
    future = torch.tensor([[0, 1], [1, 2]])
    s = coherence_scores(embed, thought, logp, context, future)
    assert s["semantic"].tolist() == pytest.approx([1.0, 0.5])  # same direction; orthogonal
    assert s["relevance"][0] == pytest.approx((1 + 2 ** -0.5) / 2) and s["relevance"][1] == pytest.approx(1.0)
    assert s["fluency"].tolist() == pytest.approx([0.5, 0.1 ** 0.5])
    expect = (0.30 * s["semantic"] + 0.25 * s["relevance"] + 0.20 * s["fluency"]) / 0.75
    torch.testing.assert_close(s["coherence"], expect)
    none_valid = coherence_scores(embed, thought, logp, context, future, context_valid=torch.zeros(2, 3, dtype=torch.bool))
    assert none_valid["semantic"].tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="token ids"):
        coherence_scores(embed, thought + 4, logp, context, future)


def test_the_coherence_filter_drops_thoughts_from_the_talk_loss_and_the_policy():
    x = _ids(2, 10)
    keep_all, _ = _thought_model(_cognate(), coherence_threshold=0.0)
    drop_all, _ = _thought_model(_cognate(), coherence_threshold=1.0)
    r_keep = keep_all.loss(x, generator=torch.Generator().manual_seed(0))
    r_drop = drop_all.loss(x, generator=torch.Generator().manual_seed(0))
    assert r_keep.keep.all() and not r_drop.keep.any()
    assert float(r_drop.parts["talk_nll"]) == 0.0 and float(r_drop.parts["policy_loss"]) == 0.0
    assert float(r_keep.parts["talk_nll"]) > 0
    r_drop.loss.backward()  # only the base loss is left: the mixing head gets no gradient
    assert drop_all.mixing.mlp[-1].weight.grad is None or drop_all.mixing.mlp[-1].weight.grad.abs().sum() == 0


def test_save_load_round_trip_and_plain_hf_use(tmp_path):
    from transformers import AutoModelForCausalLM

    import phases.cognate.modeling  # noqa: F401 - registers the Auto classes

    tm, tok = _thought_model(_cognate(memory=True))
    with torch.no_grad():
        tm.mixing.mlp[-1].bias.fill_(0.3)
        tm.start_embedding.mul_(2.0)
    out = save_thought_model(tm, tok, tmp_path / "m")
    loaded, tok2 = load_thought_model(out)
    x = _ids(2, 9)
    a, _, _ = tm.eval().think(x)
    b, _, _ = loaded.eval().think(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert tok2.convert_tokens_to_ids("<|startthought|>") == tm.start_id
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # the same dir, without thoughts
    torch.testing.assert_close(plain.get_input_embeddings().weight[tm.start_id], tm.start_embedding * tm.scale)
    assert plain.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    (out / "quietstar" / "thoughts.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError):
        load_thought_model(out)
    with pytest.raises(ArtifactError, match="not a Quiet-STaR model"):
        load_thought_model(tmp_path)


def test_generation_with_thoughts_is_seeded_and_starts_as_the_base_model():
    lm = _cognate()
    tm, _ = _thought_model(lm)
    prompt = _ids(2, 5)
    ids1, thoughts1 = tm.generate(prompt, max_new_tokens=4, return_thoughts=True)
    ids2, thoughts2 = tm.generate(prompt, max_new_tokens=4, return_thoughts=True)
    assert torch.equal(ids1, ids2) and all(torch.equal(a, b) for a, b in zip(thoughts1, thoughts2))
    assert len(thoughts1) == 4 and thoughts1[0].shape == (2, 3)
    greedy = lm.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ids1, greedy)  # w = 0: thinking does not change the text yet
    with torch.no_grad():  # once the mixing weight is not 0, the thoughts change the text
        tm.mixing.mlp[-1].bias.fill_(3.0)
    assert not torch.equal(tm.generate(prompt, max_new_tokens=4), greedy)
    sampled = tm.generate(prompt, max_new_tokens=4, do_sample=True, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == (2, 9) and not torch.isin(sampled, torch.tensor([tm.start_id, tm.end_id])).any()
    first = int(tm.generate(prompt[:1], max_new_tokens=1)[0, 5])  # stop once every row has produced "eos"
    stopped = tm.generate(prompt[:1], max_new_tokens=4, eos_token_id=first)
    assert stopped.shape == (1, 6)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tm.generate(prompt, max_new_tokens=-1)


def test_a_model_without_a_backbone_is_refused():
    with pytest.raises(ValueError, match="backbone"):
        ThoughtModel(torch.nn.Linear(2, 2), QuietStarConfig(), start_id=0, end_id=1)


def test_too_short_sequences_are_refused():
    tm, _ = _thought_model(_cognate(), n_true=4)
    with pytest.raises(ValueError, match="too short"):
        tm.loss(_ids(1, 4))


def test_mask_with_repeated_and_per_row_anchors():
    m = thought_attention_mask(3, 2, anchors=torch.tensor([[1, 1], [0, 2]]))
    assert m.shape == (2, 1, 7, 7)
    where = chain_index(3, 2, 2)
    row = m[0, 0]
    assert not row[where[1, 0], where[0, 1]] and row[where[1, 0], where[0, 0]]  # same anchor, other chain: hidden
    assert row[where[0, 0], :3].tolist() == [True, True, False]
    assert m[1, 0][where[0, 1], :3].tolist() == [True, True, True]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        thought_attention_mask(3, 1, anchors=torch.tensor([3]))


def test_heldout_losses_and_multistep_arithmetic():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    ref = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0]])
    out = heldout_losses(nll, ref, hard_fraction=0.2)
    assert out == {"loss": 3.0, "loss_hard": 3.0}
    tasks = multistep_arithmetic(0, 50, steps=2)
    assert len({t.prompt for t in tasks}) == 50
    for t in tasks:
        assert t.prompt.endswith("=") and str(eval(t.prompt[:-1])) == t.answer  # noqa: S307 - digits and +/- only
    with pytest.raises(ValueError, match="distinct"):
        multistep_arithmetic(0, 500, steps=1, max_operand=3)


def test_hard_injection_at_inference_never_thinks_on_padding():
    lm = _cognate()
    lm.config.pad_token_id = 257
    tm, _ = _thought_model(lm, injection="hard", hard_fraction=0.5)
    x = _ids(3, 12)
    x[0, 6:] = 257  # right padding, as task_accuracy pads its batches
    x[1, 9:] = 257
    _, thoughts, anchors = tm.think(x)
    assert anchors.shape == (3, 3)  # half of the shortest row's 6 real tokens
    for b, real in enumerate((6, 9, 12)):
        assert anchors[b].max() < real
