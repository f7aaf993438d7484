"""Quiet-STaR's model-agnostic building blocks (phases/quietstar/): the parallel-thought
attention mask (checked by gradients through real attention), position ids, delimiter-free
nucleus sampling, the zero-initialised mixing head, rewards / baseline / policy loss, the config,
and that the package stays free of Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coordinator.errors import ConfigError
from phases.quietstar.config import QuietStarConfig
from phases.quietstar.mask import thought_attention_mask, thought_layout, thought_position_ids
from phases.quietstar.mixing import MixingHead
from phases.quietstar.reinforce import (baseline_subtract, policy_loss, quietstar_loss, talk_rewards,
                                        thought_logprob)
from phases.quietstar.sampling import mask_thought_delimiters, sample_thought_tokens

ROOT = Path(__file__).resolve().parents[2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _idx(seq_len: int, i: int, j: int) -> int:
    """Index of the j-th thought token of position i in the extended sequence."""
    return seq_len + j * seq_len + i


# -- mask ----------------------------------------------------------------------------------------

def test_layout_anchors_and_depths():
    anchors, depth = thought_layout(3, 2)
    assert anchors.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert depth.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert anchors.dtype == depth.dtype == torch.long
    with pytest.raises(ValueError, match="seq_len"):
        thought_layout(0, 1)
    with pytest.raises(ValueError, match="steps"):
        thought_layout(2, -1)


def test_mask_base_rows_are_causal_and_thought_rows_see_only_their_own_thought():
    L, s = 5, 3
    m = thought_attention_mask(L, s)
    T = L * (1 + s)
    assert m.shape == (T, T) and m.dtype == torch.bool
    assert torch.equal(m[:L, :L], torch.tril(torch.ones(L, L, dtype=torch.bool)))
    assert not m[:L, L:].any()  # base tokens never see a thought
    for i in range(L):
        for j in range(s):
            row = m[_idx(L, i, j)]
            assert row[:L].tolist() == [k <= i for k in range(L)], (i, j)
            seen = {t for t in range(L, T) if row[t]}
            assert seen == {_idx(L, i, jj) for jj in range(j + 1)}, (i, j, sorted(seen))


def test_mask_gradients_through_attention_reach_only_the_own_thought_and_the_causal_prefix():
    L, s, D = 5, 3, 8
    T = L * (1 + s)
    g = _gen(0)
    q, k, v = (torch.randn(1, 2, T, D, generator=g, requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=thought_attention_mask(L, s))
    i = 2
    own = [_idx(L, i, j) for j in range(s)]
    out[:, :, own].sum().backward()
    for grad in (k.grad, v.grad):
        per_token = grad.abs().sum(dim=(0, 1, 3))  # (T,)
        for t in range(T):
            anchor, depth = t % L, t // L
            if depth == 0:
                visible = anchor <= i
            else:
                visible = anchor == i
            if visible:
                assert per_token[t] > 0, (t, "own thought / prefix token got no gradient")
            else:
                assert per_token[t] == 0, (t, "gradient leaked from another position's token")
    # and base outputs never depend on thought tokens
    q.grad = k.grad = v.grad = None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=thought_attention_mask(L, s))
    out[:, :, :L].sum().backward()
    assert k.grad[:, :, L:].abs().sum() == 0 and v.grad[:, :, L:].abs().sum() == 0


def test_padding_mask_hides_padded_keys_but_keeps_the_diagonal():
    L, s = 4, 2
    T = L * (1 + s)
    base_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    m = thought_attention_mask(L, s, base_mask=base_mask)
    assert m.shape == (2, 1, T, T) and m.dtype == torch.bool
    plain = thought_attention_mask(L, s)
    assert torch.equal(m[0, 0], plain)  # no padding: unchanged
    anchors, _ = thought_layout(L, s)
    padded_keys = (anchors == 0) | (anchors == 3)
    eye = torch.eye(T, dtype=torch.bool)
    assert not (m[1, 0][:, padded_keys] & ~eye[:, padded_keys]).any()
    assert m[1, 0].diagonal().all()
    assert torch.equal(m[1, 0][:, ~padded_keys], plain[:, ~padded_keys])
    # no empty rows: attention stays finite
    q = torch.randn(2, 1, T, 4, generator=_gen(1))
    assert torch.isfinite(F.scaled_dot_product_attention(q, q, q, attn_mask=m)).all()
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        thought_attention_mask(L, s, base_mask=torch.ones(2, 5))


def test_position_ids_continue_from_the_anchor():
    assert thought_position_ids(3, 2).tolist() == [0, 1, 2,   # base
                                                   1, 2, 3,   # thought token 0 of positions 0, 1, 2
                                                   2, 3, 4]   # thought token 1
    assert thought_position_ids(2, 0).tolist() == [0, 1]
    shifted = thought_position_ids(3, 1, offset=torch.tensor([0, -1]))
    assert shifted.tolist() == [[0, 1, 2, 1, 2, 3], [-1, 0, 1, 0, 1, 2]]
    with pytest.raises(ValueError, match="integer"):
        thought_position_ids(3, 1, offset=torch.tensor([0.5]))


# -- sampling ------------------------------------------------------------------------------------

START, END = 3, 5


def test_delimiters_are_never_sampled_even_when_most_likely():
    logits = torch.zeros(200, 8)
    logits[:, START] = 50.0
    logits[:, END] = 40.0
    masked = mask_thought_delimiters(logits, START, END)
    assert logits[0, START] == 50.0  # a copy
    assert torch.isinf(masked[:, [START, END]]).all() and (masked[:, [START, END]] < 0).all()
    ids = sample_thought_tokens(logits, start_id=START, end_id=END, top_p=1.0, temperature=1.0, generator=_gen(0))
    assert ids.shape == (200,) and ids.dtype == torch.long
    assert not ((ids == START) | (ids == END)).any()
    assert len(set(ids.tolist())) > 3  # the other six tokens are all in play
    with pytest.raises(ValueError, match="start_id"):
        mask_thought_delimiters(logits, 8, END)


def test_tiny_top_p_and_tiny_temperature_give_the_masked_argmax():
    logits = torch.randn(4, 6, 10, generator=_gen(2))
    logits[..., START] += 100.0  # the unmasked argmax is always a delimiter
    want = mask_thought_delimiters(logits, START, END).argmax(-1)
    for seed in range(3):
        ids = sample_thought_tokens(logits, start_id=START, end_id=END, top_p=1e-6, temperature=1.0,
                                    generator=_gen(seed))
        assert ids.shape == (4, 6) and torch.equal(ids, want)
        cold = sample_thought_tokens(logits, start_id=START, end_id=END, top_p=1.0, temperature=1e-4,
                                     generator=_gen(seed))
        assert torch.equal(cold, want)
    hot = sample_thought_tokens(logits, start_id=START, end_id=END, top_p=1.0, temperature=10.0, generator=_gen(0))
    assert not torch.equal(hot, want)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.2 over tokens 0, 1, 2 (3 = START, 5 = END are masked; 4 is ~0)
    logits = torch.full((3000, 6), -1e9)
    logits[:, :3] = torch.tensor([0.5, 0.3, 0.2]).log()
    ids = sample_thought_tokens(logits, start_id=START, end_id=END, top_p=0.75, temperature=1.0, generator=_gen(3))
    assert set(ids.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.8: token 2 is cut
    frac0 = (ids == 0).float().mean().item()
    assert abs(frac0 - 0.5 / 0.8) < 0.04  # renormalised over the kept set
    ids = sample_thought_tokens(logits, start_id=START, end_id=END, top_p=0.5, temperature=1.0, generator=_gen(3))
    assert set(ids.tolist()) == {0}  # 0.5 reaches 0.5


def test_sampling_is_deterministic_under_a_seed():
    logits = torch.randn(3, 7, 50, generator=_gen(4))
    kw = dict(start_id=START, end_id=END, top_p=0.9, temperature=1.0)
    a = sample_thought_tokens(logits, generator=_gen(11), **kw)
    b = sample_thought_tokens(logits, generator=_gen(11), **kw)
    c = sample_thought_tokens(logits, generator=_gen(12), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="top_p"):
        sample_thought_tokens(logits, generator=None, start_id=START, end_id=END, top_p=0.0, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_thought_tokens(logits, generator=None, start_id=START, end_id=END, top_p=0.5, temperature=0.0)


# -- mixing head ---------------------------------------------------------------------------------

def test_mixing_head_starts_as_the_base_model_bit_for_bit_and_learns():
    torch.manual_seed(0)
    head = MixingHead(16, mlp_hidden=12)
    h_base = torch.randn(2, 5, 16, generator=_gen(5)) * 100
    h_thought = torch.randn(2, 5, 16, generator=_gen(6)) * 100
    h_mix, w = head(h_base, h_thought)
    assert w.shape == (2, 5, 1) and torch.equal(w, torch.zeros_like(w))
    assert torch.equal(h_mix, h_base)
    # one SGD step on a loss that wants h_mix = h_thought (w = 1) moves w
    opt = torch.optim.SGD(head.parameters(), lr=1e-6)
    loss = ((h_mix - h_thought) ** 2).mean()
    loss.backward()
    assert head.mlp[-1].bias.grad.abs().sum() > 0
    opt.step()
    _, w2 = head(h_base, h_thought)
    assert (w2 != 0).all() and (w2 > 0).all()  # toward 1
    with pytest.raises(ValueError, match="16"):
        head(h_base, h_thought[..., :8])
    assert MixingHead(8).mlp[0].out_features == 8  # mlp_hidden defaults to hidden


# -- rewards and losses --------------------------------------------------------------------------

def test_rewards_are_positive_for_a_thought_that_helps():
    nll_base = torch.full((1, 1, 3, 4), 2.0)
    nll_thought = torch.full((1, 2, 3, 4), 2.0)
    nll_thought[0, 0] = 1.5  # thought 0 lowers the NLL of every true token by 0.5
    nll_thought[0, 1, 1] = 3.0  # thought 1 hurts at position 1
    r = talk_rewards(nll_base, nll_thought)
    assert r.shape == (1, 2, 3)
    assert torch.allclose(r[0, 0], torch.full((3,), 2.0))  # 4 tokens * 0.5
    assert r[0, 1].tolist() == [0.0, -4.0, 0.0]
    with pytest.raises(ValueError, match="broadcast"):
        talk_rewards(torch.zeros(1, 1, 3, 4), torch.zeros(1, 2, 3, 5))


def test_baseline_makes_advantages_sum_to_zero_per_position():
    r = torch.randn(3, 4, 7, generator=_gen(7)) * 10
    adv = baseline_subtract(r)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(3, 7), atol=1e-5)
    assert torch.allclose(adv[:, 0] - adv[:, 1], r[:, 0] - r[:, 1])
    assert torch.equal(baseline_subtract(r[:, :1]), torch.zeros(3, 1, 7))
    small = baseline_subtract(torch.randn(2, 3, 5, generator=_gen(8)))
    assert torch.allclose(small.sum(dim=1), torch.zeros(2, 5), atol=1e-6)


def test_policy_loss_clamps_negatives_masks_and_only_trains_the_policy():
    adv = torch.tensor([[[1.0, -2.0], [-1.0, 2.0]]], requires_grad=True)  # (1, 2, 2)
    logp = torch.tensor([[[-1.0, -3.0], [-2.0, -0.5]]], requires_grad=True)
    kept = policy_loss(adv, logp, remove_negative=True)
    assert kept.item() == pytest.approx(-(1.0 * -1.0 + 2.0 * -0.5) / 4)
    full = policy_loss(adv, logp, remove_negative=False)
    assert full.item() == pytest.approx(-(-1.0 + 6.0 + 2.0 - 1.0) / 4)
    kept.backward()
    assert adv.grad is None
    assert torch.equal(logp.grad, torch.tensor([[[-0.25, 0.0], [0.0, -0.5]]]))  # -clamped adv / 4
    masked = policy_loss(adv, logp, remove_negative=False, mask=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(-(-1.0 + 2.0) / 2)  # position 0 of both thoughts
    none = policy_loss(adv, logp, remove_negative=False, mask=torch.zeros(1, 2, dtype=torch.bool))
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        policy_loss(adv, logp[:, :1], remove_negative=True)


def test_thought_logprob_matches_a_hand_computation():
    logits = torch.tensor([[[0.0, 3.0, 0.0], [6.0, 0.0, 0.0]]])  # (1, S=2, V=3)
    tokens = torch.tensor([[1, 2]])
    t = 3.0
    # logits / 3: [0, 1, 0] and [2, 0, 0]
    want = (1.0 - torch.log(torch.tensor(2.0 + torch.e))) + (0.0 - torch.log(torch.tensor(torch.e ** 2 + 2.0)))
    got = thought_logprob(logits, tokens, temperature=t)
    assert got.shape == (1,) and torch.allclose(got, want.reshape(1))
    assert torch.allclose(thought_logprob(logits, tokens, temperature=1.0),
                          torch.tensor([(3.0 - torch.log(torch.tensor(2.0 + torch.e ** 3)))
                                        + (0.0 - torch.log(torch.tensor(torch.e ** 6 + 2.0)))]))
    with pytest.raises(ValueError, match="do not match"):
        thought_logprob(logits, tokens[:, :1], temperature=t)


def test_total_loss_combines_the_parts_with_the_config_weights():
    cfg = QuietStarConfig(base_loss_weight=0.25, policy_weight=10.0, remove_negative_rewards=True)
    nll_base_next = torch.tensor([[1.0, 3.0]])  # (1, L=2): mean 2
    nll_talk = torch.tensor([[[[1.0, 1.0], [5.0, 5.0]], [[3.0, 3.0], [7.0, 7.0]]]])  # (1, N=2, L=2, K=2)
    adv = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])
    logp = torch.tensor([[[-2.0, -4.0], [-1.0, -1.0]]], requires_grad=True)
    out = quietstar_loss(nll_base_next, nll_talk, adv, logp, cfg)
    assert set(out) == {"loss", "base_nll", "talk_nll", "policy_loss", "reward_mean"}
    pol = -(1.0 * -2.0 + 1.0 * -4.0) / 4
    assert out["base_nll"].item() == pytest.approx(2.0) and out["talk_nll"].item() == pytest.approx(4.0)
    assert out["policy_loss"].item() == pytest.approx(pol)
    assert out["reward_mean"].item() == pytest.approx(0.5)
    assert out["loss"].item() == pytest.approx(0.25 * 2.0 + 0.75 * 4.0 + 10.0 * pol)
    out["loss"].backward()
    assert logp.grad is not None and not out["base_nll"].requires_grad
    masked = quietstar_loss(nll_base_next, nll_talk, adv, logp, cfg, mask=torch.tensor([[True, False]]))
    assert masked["talk_nll"].item() == pytest.approx(2.0)  # position 0 only: (1 + 3) / 2
    assert masked["base_nll"].item() == pytest.approx(2.0)  # the base loss covers every token


# -- config and imports --------------------------------------------------------------------------

def test_config_defaults_and_bounds():
    cfg = QuietStarConfig()
    assert (cfg.thought_length, cfg.n_thoughts, cfg.n_true) == (32, 4, 4)
    assert (cfg.policy_weight, cfg.base_loss_weight, cfg.reinforce_temperature) == (1e6, 0.5, 3.0)
    assert cfg.injection == "all" and cfg.mixing_hidden is None and cfg.coherence_threshold is None
    for field, value in (("n_thoughts", 17), ("thought_length", 0), ("top_p", 0.0), ("injection", "some"),
                         ("hard_fraction", 1.5), ("base_loss_weight", 1.5)):
        with pytest.raises(ConfigError) as err:
            QuietStarConfig(**{field: value})
        assert [k for k, _ in err.value.problems] == [field], err.value.problems
    with pytest.raises(ConfigError, match="n_thoughts = 1"):
        QuietStarConfig(n_thoughts=1)
    assert QuietStarConfig(n_thoughts=1, policy_weight=0.0).n_thoughts == 1
    with pytest.raises(ConfigError, match="unknown key"):
        QuietStarConfig(n_thought=2)


def test_package_imports_neither_ray_nor_msgpack_and_is_light():
    script = (
        "import sys\n"
        "import phases.quietstar\n"
        "assert 'torch' not in sys.modules, 'importing the package must stay light'\n"
        "import phases.quietstar.config, phases.quietstar.mask, phases.quietstar.sampling\n"
        "import phases.quietstar.mixing, phases.quietstar.reinforce\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'msgpack'))\n"
        "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
