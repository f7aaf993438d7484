"""The weight codecs of phase 8: SeedLM (LFSR seeds), VPTQ (vector quantisation with Hessian
k-means and error feedback) and the round-to-nearest baseline: exact bit counts, the paper's
error level, lossless packing, and VPTQ beating RTN at no more bits on a Cognate model's layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phases.compression import rtn, seedlm, vptq


@pytest.mark.parametrize("bits", sorted(seedlm.TAPS))
def test_every_lfsr_is_maximal_length(bits):
    states = seedlm.lfsr_states(np.array([1]), 2**bits - 1, bits)[0]
    assert len(np.unique(states)) == 2**bits - 1 and states[-1] == 1 and states.min() >= 1


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def seed4(gaussian):
    return seedlm.compress(gaussian, block=8, latent=3, seed_bits=16)


def test_seedlm_4bit_stores_exactly_4_bits_per_weight_at_the_papers_error(gaussian, seed4):
    assert seed4.bits_per_weight == 4.0
    assert seed4.nbytes == len(seed4.to_bytes()) == 64 * 64 * 4 // 8
    err = float((seed4.decompress() - gaussian).norm() / gaussian.norm())
    assert err <= 0.13, err  # the reproduction reports 0.123 on Gaussian weights


def test_seedlm_packing_is_lossless_and_checked(seed4):
    data = seed4.to_bytes()
    back = seedlm.from_bytes(data, seed4.shape)
    assert torch.equal(back.seeds, seed4.seeds) and torch.equal(back.exponents, seed4.exponents)
    assert torch.equal(back.mantissas, seed4.mantissas)
    assert torch.equal(back.decompress(), seed4.decompress())
    with pytest.raises(ValueError):
        seedlm.from_bytes(data[:-1], seed4.shape)
    with pytest.raises(ValueError):
        seedlm.from_bytes(bytes(len(data)), seed4.shape)  # all-zero seeds: the LFSR's dead state


def test_seedlm_pads_odd_sizes_and_counts_the_padding():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    c = seedlm.compress(w, block=8, latent=3, seed_bits=8)
    assert c.decompress().shape == (5, 7)
    assert c.bits_per_weight == pytest.approx(5 * (8 + 4 + 12) / 35)  # 35 weights in 5 blocks of 8
    with pytest.raises(ValueError):
        seedlm.compress(torch.tensor([1.0, float("nan")]))


def test_more_seeds_fit_better():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    errs = [float((seedlm.compress(w, seed_bits=k).decompress() - w).norm() / w.norm()) for k in (8, 12, 16)]
    assert errs[0] > errs[1] > errs[2]


def test_rtn_counts_scales_and_is_near_lossless_at_8_bits(gaussian):
    c = rtn.compress(gaussian, bits=8, group_size=32)
    assert c.bits_per_weight == pytest.approx(8 + (16 + 8) / 32)
    assert float((c.decompress() - gaussian).norm() / gaussian.norm()) < 0.01
    c2 = rtn.compress(gaussian, bits=2)
    assert float((c2.decompress() - gaussian).norm() / gaussian.norm()) > 0.2


@pytest.fixture(scope="module")
def cognate_layers():
    """The Linear layers of a tiny-preset-shaped Cognate model and their inputs on held-out text."""
    from phases.cognate import CognateConfig
    from phases.cognate.modeling import CognateForCausalLM
    from phases.cognate.train import build_model_config
    from phases.data import DataConfig, load_corpus

    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=64, n_layers=2, n_heads=2, d_ff=168,
                        memory_slots=32, memory_chunk=16, max_seq_len=128)
    corpus = load_corpus(DataConfig(seq_len=64), seed=0)
    torch.manual_seed(0)
    model = CognateForCausalLM(build_model_config(cfg, corpus.tokenizer)).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}." and m.weight.shape[1] >= 64]
    with torch.no_grad():
        model(input_ids=corpus.windows("heldout", max_windows=8)[:, :-1])
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())
    return [(name, mods[name].weight.detach(), torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]))
            for name, xs in inputs.items()]


def test_vptq_beats_round_to_nearest_at_no_more_bits_on_cognate_layers(cognate_layers):
    """Output error ||(W - W^) X|| on the layers' own inputs, VPTQ at no more bits per weight
    (codebooks, permutation, scales all counted) than RTN at 2 and at 3 bits."""
    assert len(cognate_layers) == 7  # q, k, v, o, gate, up, down

    def out_err(wq, w, x):
        return float(((wq.double() - w.double()) @ x.double().T).norm() / (w.double() @ x.double().T).norm())
    for name, w, x in cognate_layers:
        h = vptq.hessian_from_inputs(x)
        for bits, settings in ((2, {"centroids": 16, "permute": False}), (3, {"centroids": 32})):
            v = vptq.compress(w, hessian=h, vector_len=2, **settings)
            r = rtn.compress(w, bits=bits)
            assert v.bits_per_weight <= r.bits_per_weight, (name, bits, v.bits_per_weight, r.bits_per_weight)
            assert out_err(v.decompress(), w, x) < 0.8 * out_err(r.decompress(), w, x), (name, bits)


def test_vptq_residual_codebook_and_error_feedback_help(cognate_layers):
    name, w, x = cognate_layers[0]
    h = vptq.hessian_from_inputs(x)

    def out_err(c):
        return float(((c.decompress().double() - w.double()) @ x.double().T).norm())
    plain = vptq.compress(w, hessian=None, vector_len=2, centroids=16)
    fed = vptq.compress(w, hessian=h, vector_len=2, centroids=16)
    res = vptq.compress(w, hessian=h, vector_len=2, centroids=16, residual_centroids=16)
    assert out_err(fed) < out_err(plain), "Hessian weighting + error feedback lower the output error"
    assert out_err(res) < out_err(fed) and res.bits_per_weight > fed.bits_per_weight
    assert res.bits_per_weight == pytest.approx(
        (w.numel() // 2 * (4 + 4) + 2 * 16 * 2 * 16 + w.shape[1] * math.ceil(math.log2(w.shape[1])))
        / w.numel())


def test_vptq_rejects_bad_input():
    with pytest.raises(ValueError):
        vptq.compress(torch.randn(4, 4, 4))
    with pytest.raises(ValueError):
        vptq.compress(torch.randn(8, 8), hessian=torch.eye(4))


def test_vptq_normalisation_is_stored_and_counted(cognate_layers):
    name, w, x = cognate_layers[0]
    c = vptq.compress(w, hessian=vptq.hessian_from_inputs(x), vector_len=2, centroids=16, normalize=True)
    plain = vptq.compress(w, hessian=vptq.hessian_from_inputs(x), vector_len=2, centroids=16)
    assert c.total_bits - plain.total_bits == w.shape[0] * 2 * 16  # float16 scale and offset per row
    err = float(((c.decompress() - w).double() @ x.double().T).norm() / (w.double() @ x.double().T).norm())
    assert err < 0.3, err  # the normalised codes are mapped back: output error as without it
