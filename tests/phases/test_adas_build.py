"""ADAS structural transforms: Block Influence by hand, layer dropping, FFN pruning, SVD low rank,
HF round trips, composition, argument checks, and that inputs stay untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from phases.adas.build import DEFAULT_TARGETS, block_influence, drop_layers, low_rank, param_count, prune_ffn
from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig, LowRankLinear, rotary_tables
from tests.phases.tiny_cognate import tiny_cognate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches():
    return torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _round_trip(model, ids, path):
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(loaded, CognateForCausalLM)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    return loaded


def _zero_block(model, i):
    with torch.no_grad():
        model.model.layers[i].attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def _assert_untouched(model, snap):
    state, cfg = snap
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.config.to_dict() == cfg


# ---------------------------------------------------------------- Block Influence (ShortGPT)

def test_block_influence_matches_a_hand_computation(batches):
    model = tiny_cognate(0, num_hidden_layers=3)
    with torch.no_grad():
        x = model.model.embed_tokens(batches)
        pos = torch.arange(batches.shape[1]).expand_as(batches)
        cos, sin = rotary_tables(pos, 16, model.config.rotary_base, x.dtype)
        expected = []
        for layer in model.model.layers:
            y = layer(x, cos, sin, None)
            expected.append(1.0 - F.cosine_similarity(x.double(), y.double(), dim=-1).mean().item())
            x = y
    got = block_influence(model, batches)
    assert len(got) == 2
    assert got == pytest.approx(expected, abs=1e-6)
    assert all(v > 1e-4 for v in got)


# ---------------------------------------------------------------- drop_layers

def test_drop_layers_removes_the_near_identity_block(batches, tmp_path):
    model = tiny_cognate(1, num_hidden_layers=4)
    _zero_block(model, 1)  # x + 0 + 0: an exact identity, BI ~ 0
    snap = _snapshot(model)
    bi = block_influence(model, batches)
    assert bi[1] < 1e-6 < min(bi[0], bi[2])
    new, dropped = drop_layers(model, 1, batches)
    assert dropped == [1]
    assert len(new.model.layers) == 2 and new.config.num_hidden_layers == 3
    assert not new.training
    torch.testing.assert_close(_logits(new, batches), _logits(model, batches))
    block = sum(p.numel() for p in model.model.layers[1].parameters())
    assert param_count(new) == param_count(model) - block
    _assert_untouched(model, snap)
    _round_trip(new, batches, tmp_path / "dropped")


def test_dropped_model_equals_the_original_with_that_block_skipped(batches):
    model = tiny_cognate(2, num_hidden_layers=4)
    new, dropped = drop_layers(model, 2, batches)
    bi = block_influence(model, batches)
    assert dropped == sorted(sorted(range(3), key=lambda i: bi[i])[:2])
    ref = copy.deepcopy(model)
    for i in dropped:
        _zero_block(ref, i)  # the residual makes a zeroed block exactly the identity
    torch.testing.assert_close(_logits(new, batches), _logits(ref, batches))


def test_drop_layers_ties_go_to_the_later_block_and_edges(batches, tmp_path):
    model = tiny_cognate(3, num_hidden_layers=4, memory_enabled=True)
    _zero_block(model, 0)
    _zero_block(model, 1)  # same input, same output as block 0: equal BI
    bi = block_influence(model, batches)
    assert bi[0] == bi[1]
    assert drop_layers(model, 1, batches)[1] == [1]
    same, none = drop_layers(model, 0, batches)
    assert none == [] and same is not model
    torch.testing.assert_close(_logits(same, batches), _logits(model, batches), rtol=0, atol=0)
    bare, dropped = drop_layers(model, 3, batches)  # every plain block; ACT block and memory stay
    assert dropped == [0, 1, 2] and len(bare.model.layers) == 0 and bare.config.num_hidden_layers == 1
    assert param_count(bare.model.memory) == param_count(model.model.memory)
    _round_trip(bare, batches, tmp_path / "bare")


# ---------------------------------------------------------------- prune_ffn

def _mlp_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


def test_prune_ffn_keep_one_is_an_unchanged_copy(batches):
    model = tiny_cognate(4)
    new, report = prune_ffn(model, 1.0, batches)
    assert report["width"] == 64 and report["kept"]["model.layers.0.mlp"] == list(range(64))
    assert set(report["kept"]) == {"model.layers.0.mlp", "model.act.block.mlp"}
    _assert_untouched(new, _snapshot(model))
    torch.testing.assert_close(_logits(new, batches), _logits(model, batches), rtol=0, atol=0)


def test_prune_ffn_removes_the_zero_output_neurons(batches, tmp_path):
    model = tiny_cognate(5, num_hidden_layers=3, memory_enabled=True)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp"):
                module.down_proj.weight[:, 1::2] = 0.0  # odd neurons write nothing: score 0
    snap = _snapshot(model)
    new, report = prune_ffn(model, 0.5, batches)
    assert report["width"] == 32 and new.config.intermediate_size == 32
    assert report["kept"] == {name: list(range(0, 64, 2))
                              for name in ("model.layers.0.mlp", "model.layers.1.mlp", "model.act.block.mlp")}
    assert _mlp_params(new) * 2 == _mlp_params(model)
    assert param_count(new) < param_count(model)
    torch.testing.assert_close(_logits(new, batches), _logits(model, batches))
    _assert_untouched(model, snap)
    _round_trip(new, batches, tmp_path / "pruned")


def test_prune_ffn_keeps_the_top_scores_and_slices_sub_norm(batches, tmp_path):
    model = tiny_cognate(6, sub_norm=True)
    new, report = prune_ffn(model, 0.3, batches)
    width = round(0.3 * 64)
    assert report["width"] == width
    mlp = new.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (width, 32) and mlp.up_proj.weight.shape == (width, 32)
    assert mlp.down_proj.weight.shape == (32, width) and mlp.sub_norm.weight.shape == (width,)
    # The kept neurons are the top scores of mean |h_j| * ||W_down[:, j]||, computed here by hand.
    old = model.model.layers[0].mlp
    with torch.no_grad():
        x = model.model.embed_tokens(batches)
        cos, sin = rotary_tables(torch.arange(16).expand_as(batches), 16, 10000.0, x.dtype)
        block = model.model.layers[0]
        x = x + block.attn(block.input_norm(x), cos, sin, None)
        z = block.post_attn_norm(x)
        h = old.sub_norm(F.silu(old.gate_proj(z)) * old.up_proj(z))
        score = h.abs().mean((0, 1)) * old.down_proj.weight.norm(dim=0)
    assert report["kept"]["model.layers.0.mlp"] == sorted(score.topk(width).indices.tolist())
    _round_trip(new, batches, tmp_path / "subnorm")


# ---------------------------------------------------------------- low_rank

def _targets(model):
    return {n: m for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n.rpartition(".")[2] in DEFAULT_TARGETS}


def test_low_rank_is_exact_on_low_rank_weights(batches, tmp_path):
    model = tiny_cognate(7, memory_enabled=True)
    gen = torch.Generator().manual_seed(1)
    names = _targets(model)
    with torch.no_grad():
        for m in names.values():  # every target exactly rank 4
            a = torch.randn(m.out_features, 4, generator=gen)
            m.weight.copy_(a @ torch.randn(4, m.in_features, generator=gen) * 0.1)
    snap = _snapshot(model)
    new, ranks = low_rank(model, 4 / 32, targets=DEFAULT_TARGETS)
    assert ranks == dict.fromkeys(names, 4) and len(ranks) == 2 * 7 + 4  # two blocks + the memory's q/k/v/o
    assert new.config.linear_ranks == ranks
    assert isinstance(new.model.layers[0].mlp.down_proj, LowRankLinear)
    assert type(new.lm_head) is torch.nn.Linear and type(new.model.act.halt) is torch.nn.Linear
    assert param_count(new) < param_count(model)
    torch.testing.assert_close(_logits(new, batches), _logits(model, batches), rtol=0, atol=1e-5)
    _assert_untouched(model, snap)
    loaded = _round_trip(new, batches, tmp_path / "low")
    assert "model.layers.0.mlp.up_proj.down.weight" in loaded.state_dict()


def test_low_rank_svd_factors_and_parameter_rule(batches):
    model = tiny_cognate(8)
    new, ranks = low_rank(model, 0.25, targets=("up_proj",))
    assert ranks == {"model.layers.0.mlp.up_proj": 8, "model.act.block.mlp.up_proj": 8}
    w = model.model.layers[0].mlp.up_proj.weight.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    low = new.model.layers[0].mlp.up_proj
    torch.testing.assert_close((low.up.weight @ low.down.weight).double(), (u[:, :8] * s[:8]) @ vh[:8],
                               rtol=0, atol=1e-6)
    # r * (in + out) < in * out: 32 x 32 saves only below rank 16
    assert set(low_rank(model, 0.5, targets=("q_proj",))[1].values()) == set()
    assert set(low_rank(model, 15 / 32, targets=("q_proj",))[1].values()) == {15}
    same, nothing = low_rank(model, 1.0)
    assert nothing == {} and same.config.linear_ranks is None
    torch.testing.assert_close(_logits(same, batches), _logits(model, batches), rtol=0, atol=0)


# ---------------------------------------------------------------- composition, config, arguments

def test_transforms_compose_and_round_trip(batches, tmp_path):
    model = tiny_cognate(9, num_hidden_layers=4)
    _zero_block(model, 1)
    low, ranks = low_rank(model, 0.25)
    pruned, report = prune_ffn(low, 0.5, batches)  # slices the factors of gate/up/down
    assert pruned.model.layers[0].mlp.down_proj.in_features == 32
    dropped, idx = drop_layers(pruned, 1, batches)
    assert idx == [1]
    assert dropped.config.linear_ranks == {k.replace("layers.2.", "layers.1."): v
                                           for k, v in ranks.items() if "layers.1." not in k}
    again, more = low_rank(dropped, 0.25)  # already factorised modules stay as they are
    assert more == {} and again.config.linear_ranks == dropped.config.linear_ranks
    _round_trip(dropped, batches, tmp_path / "composed")


def test_linear_ranks_config_is_checked():
    cfg = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="model.nope"):
        CognateForCausalLM(CognateModelConfig(**cfg, linear_ranks={"model.nope": 2}))
    with pytest.raises(ValueError, match="model.norm"):
        CognateForCausalLM(CognateModelConfig(**cfg, linear_ranks={"model.norm": 2}))
    with pytest.raises(ValueError, match="model.act.halt"):  # biased
        CognateForCausalLM(CognateModelConfig(**cfg, linear_ranks={"model.act.halt": 1}))
    with pytest.raises(ValueError, match="linear_ranks"):
        CognateModelConfig(**cfg, linear_ranks={"lm_head": 0})
    model = CognateForCausalLM(CognateModelConfig(**cfg, linear_ranks={"model.layers.0.attn.o_proj": 3}))
    assert model.model.layers[0].attn.o_proj.rank == 3
    assert model.model.layers[0].attn.o_proj.up.weight.std() > 0  # initialised like any Linear


@pytest.mark.parametrize("call, name", [
    (lambda m, b: drop_layers(m, -1, b), "n"),
    (lambda m, b: drop_layers(m, 2, b), "n"),
    (lambda m, b: prune_ffn(m, 0.0, b), "keep"),
    (lambda m, b: prune_ffn(m, 1.5, b), "keep"),
    (lambda m, b: low_rank(m, 0.0), "fraction"),
    (lambda m, b: low_rank(m, 1.01), "fraction"),
    (lambda m, b: low_rank(m, 0.5, targets=()), "targets"),
    (lambda m, b: block_influence(m, b[0]), "batches"),
    (lambda m, b: prune_ffn(m, 0.5, b.float()), "batches"),
])
def test_bad_arguments_raise_naming_the_argument(batches, call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call(tiny_cognate(0), batches)


def test_the_bitnet_layer_list_follows_dropped_and_factorised_layers():
    """``config.bitnet`` (phase 4's ternary layers and thresholds) stays true: dropped blocks'
    layers go, later blocks are renumbered, factorised layers are no longer listed as ternary."""
    model = tiny_cognate(1, num_hidden_layers=3)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    model.config.bitnet = {"layers": names, "thresholds": {n: 0.4 for n in names}, "packing": "base3"}
    batches = torch.randint(0, 258, (2, 8), generator=torch.Generator().manual_seed(0))
    dropped, idx = drop_layers(model, 1, batches)
    linears = {n for n, m in dropped.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(dropped.config.bitnet["layers"]) <= linears
    assert len(dropped.config.bitnet["layers"]) == len(names) // 2 and dropped.config.bitnet["packing"] == "base3"
    assert set(dropped.config.bitnet["thresholds"]) == set(dropped.config.bitnet["layers"])
    assert all(n.startswith("model.layers.0.") for n in dropped.config.bitnet["layers"])
    factorised, ranks = low_rank(dropped, 0.25)
    assert ranks and not set(ranks) & set(factorised.config.bitnet["layers"])
    assert model.config.bitnet["layers"] == names, "the input's config is untouched"
