"""Phase 4 (phases/bitnet/): the thresholded quantizer, calibration, SubLN, the Grokfast filter,
and the whole phase (train_bitnet): measured metrics, a packed model that reproduces the QAT
model exactly, a ternary HF export, bit-identical results after an interruption and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from coordinator.errors import PhaseError
from phases.bitnet.calibrate import add_sub_norm, choose_thresholds, collect, target_layers
from phases.bitnet.config import BitNetConfig
from phases.bitnet.packed import PackedBitLinear, int8_kernel_available, load_packed
from phases.bitnet.quant import BitLinear, ternary_codes, weight_quant
from phases.bitnet.train import train_bitnet
from phases.data import DataConfig, load_corpus
from serialization.checkpoint import sha256_dir
from tests.phases.resume_checks import foreign_checkpoint_is_refused, interrupt_then_resume
from tests.phases.tiny_cognate import tiny_cognate, tiny_model_dir

DATA = DataConfig(seq_len=24)
CFG = BitNetConfig(calibration_samples=12, calibration_rows=64, sparsity_thresholds=True, sub_norm=True, steps=4,
                   batch_size=4, lr=1e-3, lr_warmup_steps=1, checkpoint_every=2, log_every=2, eval_batches=1,
                   eval_tasks=2, profile_batch=2, profile_seq_len=16, profile_repeats=2, grokfast={"enabled": True})


# -- the quantizer with a sparsity threshold ------------------------------------------------------

def test_thresholded_quantizer_golden_values():
    """TWN form: mean|w| = 0.57, threshold 0.7 -> 0.399; kept |w| 0.5, 0.9, 1.3 -> scale 0.9."""
    w = torch.tensor([0.1, -0.5, 0.9, -1.3, 0.05])
    assert torch.allclose(weight_quant(w, 0.7), torch.tensor([0.0, -0.9, 0.9, -0.9, 0.0]))
    codes, scale = ternary_codes(w, 0.7)
    assert codes.tolist() == [0, -1, 1, -1, 0] and math.isclose(float(scale), 0.9, rel_tol=1e-6)
    # None is BitNet's absmean: round(w / 0.57) -> [0, -1, 1, -1, 0] times 0.57
    assert torch.allclose(weight_quant(w), torch.tensor([0.0, -0.57, 0.57, -0.57, 0.0]))


def test_bitlinear_eval_is_the_packed_arithmetic_and_training_passes_gradients():
    torch.manual_seed(0)
    layer = BitLinear.from_linear(nn.Linear(40, 7), threshold=0.6)
    x = torch.randn(3, 5, 40, requires_grad=True)
    layer(x).sum().backward()  # training mode: the STE
    assert x.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    layer.eval()
    packed = PackedBitLinear.from_bitlinear(layer, "base3")
    with torch.no_grad():
        assert torch.equal(layer(x), packed(x))
        if int8_kernel_available():  # fbgemm's int8 GEMM: exact integer products, the same bits
            int8 = PackedBitLinear(packed.packed, packed.gamma, (7, 40), "base3", packed.bias, kernel="int8")
            assert torch.equal(int8(x), packed(x)) and torch.equal(int8(x[0, :1]), packed(x[0, :1]))


@pytest.mark.parametrize("fmt", ["base3", "2bit"])
def test_the_decode_kernel_in_row_tiles_gives_the_same_bits(fmt, monkeypatch):
    import phases.bitnet.packed as packed_module

    torch.manual_seed(1)
    layer = BitLinear.from_linear(nn.Linear(37, 29)).eval()  # 37 * rows is never a multiple of 4 or 5
    x = torch.randn(6, 37)
    with torch.no_grad():
        whole = PackedBitLinear.from_bitlinear(layer, fmt)(x)
        monkeypatch.setattr(packed_module, "TILE_WEIGHTS", 3 * 37)  # tiles of 3 rows: 10 tiles, the last of 2
        assert torch.equal(PackedBitLinear.from_bitlinear(layer, fmt)(x), whole)
        assert torch.equal(layer(x), whole)


# -- calibration ------------------------------------------------------------------------------

def test_collect_records_each_layers_input_statistics():
    model = tiny_cognate(memory_enabled=False)
    layers = target_layers(model, ["lm_head"])
    assert "lm_head" not in layers and "model.layers.0.mlp.down_proj" in layers
    seen = []
    handle = model.get_submodule("model.layers.0.mlp.down_proj").register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    windows = torch.randint(0, 258, (5, 9), generator=torch.Generator().manual_seed(1))
    stats = collect(model, layers, windows, batch_size=2, rows=16)
    handle.remove()
    x = torch.cat(seen)
    s = stats["model.layers.0.mlp.down_proj"]
    assert s.tokens == 45 == x.shape[0]
    assert math.isclose(s.token_rms_mean, float(x.square().mean(-1).sqrt().mean()), rel_tol=1e-9)
    assert math.isclose(s.token_absmax_mean, float(x.abs().amax(-1).mean()), rel_tol=1e-9)
    assert math.isclose(s.absmax, float(x.abs().max()), rel_tol=1e-6)
    assert s.rows[0].shape == (16, x.shape[1])
    assert stats["model.memory.q_proj"].tokens == 0  # the memory is off: never called


def test_thresholds_are_the_grid_values_with_least_output_error():
    model = tiny_cognate(memory_enabled=False)
    layers = target_layers(model, ["lm_head"])
    windows = torch.randint(0, 258, (4, 9), generator=torch.Generator().manual_seed(2))
    stats = collect(model, layers, windows, rows=32)
    grid = (0.3, 0.6, 0.9)
    chosen, errors = choose_thresholds(model, stats, grid)
    assert "model.memory.q_proj" not in chosen  # saw no input: keeps absmean
    for name, t in chosen.items():
        x, w = stats[name].rows[0], model.get_submodule(name).weight.detach()
        ref = (x @ w.T).square().sum().clamp(min=1e-30)  # the ACT halting unit starts at zero weights
        brute = {g: float((x @ (w - weight_quant(w, g)).T).square().sum() / ref) for g in grid}
        assert t == min(grid, key=lambda g: brute[g]), name
        assert math.isclose(errors[name][f"{t:g}"], brute[t], rel_tol=1e-5)


def test_sub_norm_starts_at_the_calibrated_rms_and_keeps_the_model_close():
    model = tiny_cognate(memory_enabled=False)
    layers = target_layers(model, ["lm_head"])
    windows = torch.randint(0, 258, (4, 12), generator=torch.Generator().manual_seed(3))
    stats = collect(model, layers, windows)
    sub = add_sub_norm(model, stats)
    assert sub.config.sub_norm and not model.config.sub_norm
    gain = sub.get_submodule("model.layers.0.mlp.sub_norm").weight
    assert torch.allclose(gain, torch.full_like(gain, stats["model.layers.0.mlp.down_proj"].token_rms_mean))
    with torch.no_grad():
        a, b = model(input_ids=windows).logits, sub(input_ids=windows).logits
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()
    with pytest.raises(PhaseError, match="already has SubLN"):
        add_sub_norm(sub, stats)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(PhaseError, match="sub_norm is defined for Cognate models"):
        add_sub_norm(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)), stats)


# -- the phase --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DATA, seed=0)


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    return tiny_model_dir(corpus, tmp_path_factory.mktemp("in") / "m")


def _run(model_dir, corpus, root, cfg=CFG, log=None):
    return train_bitnet(model_dir, cfg, corpus, seed=3, work_dir=root / "work", out_dir=root / "hf",
                        packed_dir=root / "packed", log=log)


@pytest.fixture(scope="module")
def reference(model_dir, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    logged = []
    out = _run(model_dir, corpus, root, log=lambda m, s: logged.append((s, m)))
    return root, out, logged


def test_the_phase_stores_packed_ternary_weights_and_measures_them(reference, corpus):
    from transformers import AutoModelForCausalLM

    root, out, logged = reference
    m = out["metrics"]
    assert m["bitnet/ternary_bits_per_weight"] <= 1.67 and m["bitnet/ternary_layer_ratio"] >= 19
    packed_bytes = (root / "packed" / "bitnet.safetensors").stat().st_size
    assert m["bitnet/packed_bytes"] == packed_bytes
    assert m["bitnet/compression_ratio"] == m["bitnet/input_bytes"] / packed_bytes
    assert m["bitnet/calibration_samples"] == 12 and m["bitnet/steps"] == 4
    assert 0 < m["bitnet/sparsity_ratio"] < 1 and 0 < m["bitnet/quantization_error_relative"] < 1
    assert m["bitnet/packed_max_abs_logit_diff"] == 0.0  # the packed model computes as the QAT model
    assert m["bitnet/speed/latency_p95_ms"] >= m["bitnet/speed/latency_p50_ms"] > 0
    assert m["bitnet/memory/peak_mb"] > m["bitnet/memory/allocated_mb"] > 0
    assert [s for s, _ in logged] == [2, 4] and "bitnet/qat_loss" in logged[0][1]
    assert set(out["calibration"]["thresholds"]) <= set(out["report"]["layers"])
    packed = load_packed(root / "packed")
    assert sum(isinstance(x, PackedBitLinear) for x in packed.modules()) == m["bitnet/ternary_layers"]
    export = AutoModelForCausalLM.from_pretrained(root / "hf")
    assert export.config.sub_norm and export.config.bitnet["packing"] == "base3"
    for name in export.config.bitnet["layers"]:
        codes, _ = ternary_codes(packed.get_submodule(name).codes().float())
        weight = export.get_submodule(name).weight.detach()
        assert torch.unique(weight.abs()).numel() <= 2 and torch.equal(torch.sign(weight).to(torch.int8),
                                                                       packed.get_submodule(name).codes())


def test_same_seed_same_hashes_also_after_an_interruption(reference, model_dir, corpus, tmp_path):
    root, _, _ = reference
    cut = tmp_path / "cut"
    interrupt_then_resume(lambda r, log: _run(model_dir, corpus, r, log=log), cut, crash_step=4,
                          checkpoints_left=["ckpt-00000002.json"])
    assert (sha256_dir(cut / "hf"), sha256_dir(cut / "packed")) == (sha256_dir(root / "hf"),
                                                                    sha256_dir(root / "packed"))


def test_a_checkpoint_of_another_config_is_refused_and_kept(reference, model_dir, corpus, tmp_path):
    root, _, _ = reference
    other = CFG.model_copy(update={"lr": 2e-3})
    foreign_checkpoint_is_refused(root / "work", tmp_path, lambda r: _run(model_dir, corpus, r, cfg=other))


def test_a_bitnet_output_is_refused_as_input(reference, corpus, tmp_path):
    root, _, _ = reference
    with pytest.raises(PhaseError, match="already a BitNet model"):
        _run(root / "hf", corpus, tmp_path)
    assert not (tmp_path / "hf").exists()


def test_any_hf_causal_lm_with_linear_projections_is_quantized(corpus, tmp_path):
    """A Llama (not a Cognate model): every projection but lm_head becomes ternary, stored packed,
    and the packed model reproduces the QAT model exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from phases.cognate.train import save_model_dir  # writes any HF model with the data tokenizer

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=corpus.tokenizer.vocab_size, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=64))
    model_dir = save_model_dir(llama, corpus.tokenizer, tmp_path / "llama")
    cfg = CFG.model_copy(update={"sub_norm": False, "grokfast": CFG.grokfast.model_copy(update={"enabled": False})})
    out = _run(model_dir, corpus, tmp_path, cfg=cfg)
    m = out["metrics"]
    assert m["bitnet/ternary_layers"] == 7 and m["bitnet/packed_max_abs_logit_diff"] == 0.0
    assert "model.layers.0.self_attn.q_proj" in out["report"]["layers"]
    packed = load_packed(tmp_path / "packed")
    assert type(packed).__name__ == "LlamaForCausalLM" and isinstance(packed.model.layers[0].mlp.down_proj,
                                                                       PackedBitLinear)
    with pytest.raises(PhaseError, match="Cognate"):
        _run(model_dir, corpus, tmp_path / "sub", cfg=cfg.model_copy(update={"sub_norm": True}))
