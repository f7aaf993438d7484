"""The compression stages the agents call: measured sensitivity, per-weight sparsity allocation,
pruning to a target, the narrower student, distillation that lowers the loss and keeps pruned
weights at zero, calibration Hessians, and the ``compress:`` config's strategies."""

from __future__ import annotations

import copy

import pytest
import torch

from coordinator.errors import ConfigError
from phases.compression import pruning
from phases.compression.analyze import analyze, weight_matrices
from phases.compression.calibrate import linear_hessians
from phases.compression.config import STAGES, CompressConfig
from phases.compression.distill import distill
from phases.compression.student import narrow_ffn


@pytest.fixture(scope="module")
def corpus():
    from phases.data import DataConfig, load_corpus

    return load_corpus(DataConfig(seq_len=32), seed=0)


@pytest.fixture
def model(corpus):
    from phases.cognate import CognateConfig
    from phases.cognate.modeling import CognateForCausalLM
    from phases.cognate.train import build_model_config

    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                        memory_slots=16, memory_chunk=8, max_seq_len=64)
    torch.manual_seed(0)
    return CognateForCausalLM(build_model_config(cfg, corpus.tokenizer)).eval()


def test_sensitivity_is_measured_and_the_model_is_restored(model, corpus):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = analyze(model, corpus, batch_size=4, max_batches=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights restored"
    assert set(out["layers"]) == set(weight_matrices(model))
    sens = [v["sensitivity"] for v in out["layers"].values()]
    assert any(abs(s) > 0 for s in sens), "int4 on a matrix moves the held-out loss"
    assert out["potential_ratio_estimate"] > 1.0


def test_layer_sparsities_average_the_target_and_spare_the_sensitive():
    sens = {"a": 0.5, "b": 0.1, "c": 0.0, "d": 0.3}
    s = pruning.layer_sparsities(sens, 0.4, 0.5)
    assert sum(s.values()) / 4 == pytest.approx(0.4)
    assert s["c"] > s["b"] > s["d"] > s["a"], "less sparsity for more sensitivity"
    assert set(pruning.layer_sparsities(sens, 0.4, 0.0).values()) == {0.4}


def test_prune_reaches_the_target_and_rejects_unknown_methods(model):
    masks = pruning.prune(model, method="magnitude", sparsity=0.5)
    for name, m in masks.items():
        assert (~m).sum().item() == round(0.5 * m.numel()), name
    with pytest.raises(ValueError, match="valid: magnitude, taylor, structured"):
        pruning.prune(model, method="random", sparsity=0.5)


def test_the_student_is_physically_narrower_and_runs(model):
    student = narrow_ffn(model, 0.5)
    assert student.config.intermediate_size == 24
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters())
    assert model.config.intermediate_size == 48, "the teacher is untouched"
    ids = torch.randint(0, 200, (2, 16))
    assert student(input_ids=ids).logits.shape == model(input_ids=ids).logits.shape
    full = narrow_ffn(model, 1.0)  # all neurons kept (reordered by nothing): the same function
    assert torch.allclose(full(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_distillation_lowers_the_loss_keeps_masks_and_is_deterministic(model, corpus):
    teacher = model
    student = narrow_ffn(teacher, 0.5)
    masks = pruning.prune(student, method="magnitude", sparsity=0.5)
    twin = copy.deepcopy(student)
    out = distill(teacher, student, corpus, steps=20, lr=3e-3, batch_size=4, seed=0, masks=masks)
    assert out["distill/loss"] < out["distill/loss_initial"]
    for name, p in student.named_parameters():
        if name in masks:
            assert (p[~masks[name]] == 0).all(), f"{name}: pruned weights stay zero"
    distill(teacher, twin, corpus, steps=20, lr=3e-3, batch_size=4, seed=0, masks=masks)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), twin.state_dict().values()))


def test_calibration_hessians_are_gram_matrices_of_the_inputs(model, corpus):
    batch = corpus.windows("heldout", max_windows=2)[:, :-1]
    h = linear_hessians(model, [batch], names=["model.layers.0.mlp.down_proj.weight"])
    (H,) = h.values()
    assert H.shape == (48, 48) and torch.allclose(H, H.T)
    assert torch.linalg.eigvalsh(H).min() > -1e-9, "positive semi-definite"


def test_config_strategies_and_errors():
    assert CompressConfig().stages == STAGES["hybrid"] == ("prune", "distill", "quantize")
    assert CompressConfig(strategy="quantization").stages == ("quantize",)
    with pytest.raises((ConfigError, ValueError), match="codecs"):
        CompressConfig(codecs=())
    with pytest.raises((ConfigError, ValueError)):
        CompressConfig(codecs=("int8", "int3"))
    with pytest.raises((ConfigError, ValueError)):
        CompressConfig(sparsity=1.0)
