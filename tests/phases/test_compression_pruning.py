"""Pruning: exact sparsities, the right entries removed (smallest magnitude, whole neurons and
heads, smallest Taylor importance), the progressive schedule, and typed errors."""

from __future__ import annotations

import pytest
import torch

from phases.compression import pruning


@pytest.fixture
def model():
    from phases.cognate import CognateConfig
    from phases.cognate.modeling import CognateForCausalLM
    from phases.cognate.train import build_model_config
    from phases.data import DataConfig, load_corpus

    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                        memory_slots=16, memory_chunk=8, max_seq_len=64)
    corpus = load_corpus(DataConfig(seq_len=32), seed=0)
    torch.manual_seed(0)
    m = CognateForCausalLM(build_model_config(cfg, corpus.tokenizer))
    m.batches = [corpus.windows("heldout", max_windows=4)]
    return m


def test_the_reference_schedule():
    assert pruning.progressive_schedule(0.6, 3) == [0.2, 0.4, 0.6]
    with pytest.raises(ValueError):
        pruning.progressive_schedule(1.0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_removes_exactly_the_smallest(model, scope):
    weights = pruning.prunable(model)
    assert weights and not any("lm_head" in n for n in weights)
    masks = pruning.magnitude_masks(model, 0.4, scope=scope)
    if scope == "global":
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * total)
    for name, mask in masks.items():
        w = weights[name].detach().abs()
        if scope == "layer":
            assert int((~mask).sum()) == round(0.4 * w.numel())
        if scope == "layer" and (~mask).any() and mask.any():
            assert w[~mask].max() <= w[mask].min()
    pruning.apply_masks(model, masks)
    after = pruning.prunable(model)
    assert all(bool((after[n][~m] == 0).all()) for n, m in masks.items())
    assert pruning.sparsity(model) >= 0.4 - 1e-3  # (some weights start at zero, e.g. the halting unit)
    assert torch.isfinite(model(input_ids=model.batches[0]).logits).all()


def test_structured_neurons_and_heads_are_removed_whole(model):
    neurons = pruning.structured_masks(model, 0.5, unit="neuron")
    heads = pruning.structured_masks(model, 0.5, unit="head")
    gate = next(m for n, m in neurons.items() if n.endswith("mlp.gate_proj.weight"))
    down = next(m for n, m in neurons.items() if n.endswith("mlp.down_proj.weight"))
    rows = gate.all(dim=1)
    assert int((~rows).sum()) == 24 and torch.equal(gate.any(dim=1), rows), "whole rows"
    assert torch.equal(down.all(dim=0), rows), "down's columns follow gate's rows"
    q = next(m for n, m in heads.items() if n.endswith("attn.q_proj.weight"))
    kept = q.all(dim=1).reshape(4, 8)  # 4 heads of 8 dims
    assert int((~kept.all(dim=1)).sum()) == 2 and torch.equal(kept.all(dim=1), kept.any(dim=1)), "whole heads"
    pruning.apply_masks(model, {**neurons, **heads})
    assert torch.isfinite(model(input_ids=model.batches[0]).logits).all()
    with pytest.raises(ValueError):
        pruning.structured_masks(model, 0.5, unit="layer")


def test_taylor_importance_is_weight_times_gradient(model):
    scores = pruning.gradient_importance(model, model.batches)
    name = next(iter(scores))
    model.zero_grad()
    model(input_ids=model.batches[0], labels=model.batches[0]).loss.backward()
    w = dict(model.named_parameters())[name]
    assert torch.allclose(scores[name], (w.detach() * w.grad).abs().double())
    masks = pruning.taylor_masks(model, model.batches, 0.3)
    assert (masks[name] == (scores[name] > scores[name].reshape(-1).kthvalue(round(0.3 * w.numel())).values)).float().mean() > 0.99


def test_bad_masks_are_typed_errors(model):
    with pytest.raises(KeyError):
        pruning.apply_masks(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})
    name, w = next(iter(pruning.prunable(model).items()))
    with pytest.raises(ValueError):
        pruning.apply_masks(model, {name: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError):
        pruning.magnitude_masks(model, 1.0)
