"""Exact parameter targeting: the analytic count equals the built model's, and targets are hit within 0.1%."""

from __future__ import annotations

import pytest
import torch

from coordinator.errors import ConfigError
from phases.cognate import CognateForCausalLM, CognateModelConfig, count_params, solve_shape


def _built_count(vocab, shape, *, tie=False, slots=64, memory_dim=None, act_steps=8):
    cfg = CognateModelConfig(vocab_size=vocab, hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
                             num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                             tie_word_embeddings=tie, memory_slots=slots, memory_dim=memory_dim,
                             act_max_steps_train=act_steps)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = CognateForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie, slots, memory_dim, act_steps", [(False, 64, None, 8), (True, 16, 24, 4)])
def test_analytic_count_equals_the_models_parameters(tie, slots, memory_dim, act_steps):
    shape = {"d_model": 48, "n_layers": 3, "n_heads": 4, "d_ff": 100}
    analytic = count_params(vocab_size=300, d_model=48, n_layers=3, d_ff=100, tie_embeddings=tie,
                            act_max_steps=act_steps, memory_slots=slots, memory_dim=memory_dim)
    assert analytic == _built_count(300, shape, tie=tie, slots=slots, memory_dim=memory_dim, act_steps=act_steps)


def test_reference_target_25m_is_hit_within_0_1_percent():
    target = 25_069_534
    shape, count = solve_shape(target, 32_000, d_model=216, n_layers=11, n_heads=4, memory_slots=8192)
    assert shape["d_model"] == 216 and shape["n_layers"] == 11 and shape["n_heads"] == 4
    assert abs(count - target) / target <= 1e-3
    assert count == _built_count(32_000, shape, slots=8192)
    free, free_count = solve_shape(target, 32_000, memory_slots=8192)  # every dimension searched
    assert abs(free_count - target) / target <= 1e-3 and free_count == _built_count(32_000, free, slots=8192)


def test_tiny_target_is_hit_within_0_1_percent():
    shape, count = solve_shape(150_000, 258, memory_slots=32)
    assert abs(count - 150_000) <= 150 and count == _built_count(258, shape, slots=32)


def test_unreachable_target_names_the_field():
    with pytest.raises(ConfigError) as err:
        solve_shape(1_000, 32_000, d_model=216, n_layers=11)
    assert err.value.problems[0][0] == "target_params" and "closest" in err.value.problems[0][1]


def test_default_config_is_the_reference_small_model():
    from phases.cognate import CognateConfig, model_vocab_size, resolve_shape
    from phases.data import byte_tokenizer

    cfg = CognateConfig()
    vocab = model_vocab_size(cfg, byte_tokenizer())  # rows beyond the tokenizer's are reserved
    shape, count = resolve_shape(cfg, vocab)
    assert vocab == 32_000 and (shape["d_model"], shape["n_layers"], shape["n_heads"]) == (216, 11, 4)
    assert abs(count - 25_069_534) / 25_069_534 <= 1e-3
    with pytest.raises(ConfigError) as err:
        model_vocab_size(CognateConfig(vocab_size=100), byte_tokenizer())
    assert err.value.problems[0][0] == "vocab_size"
