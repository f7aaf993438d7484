"""The weight codecs of phase 8: SeedLM (LFSR seeds), VPTQ (vector quantisation with Hessian
k-means and error feedback) and the round-to-nearest baseline: exact bit counts, the paper's
error level, lossless packing, and VPTQ beating RTN at no more bits on a Cognate model's layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phases.compression import rtn, seedlm, vptq
from phases.compression.seedlm import SeedLMTooSlow


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


def _dense_seedlm(weight: torch.Tensor, block: int, latent: int, seed_bits: int) -> list[tuple[int, int, list]]:
    """The exhaustive search written plainly, the reference for the fast one: every block against
    every seed's U(s), float64, the first (lowest) seed of the least error: (seed, e, q) per block."""
    v = seedlm.lfsr_states(np.arange(1, 2**seed_bits, dtype=np.uint32), block * latent, seed_bits)
    half = 2.0 ** (seed_bits - 1)
    u = torch.from_numpy((v.astype(np.float64).reshape(-1, block, latent) - half) / (half - 1.0))
    u_pinv = torch.linalg.pinv(u)
    flat = weight.reshape(-1).double()
    out = []
    for w in torch.cat([flat, flat.new_zeros((-len(flat)) % block)]).reshape(-1, block):
        t = u_pinv @ w  # (S, P)
        e = torch.ceil(torch.log2(t.abs().amax(1).clamp_min(1e-30) / 7.5)).clamp(-8, 7)
        q = torch.round(t / torch.exp2(e)[:, None]).clamp(-8, 7)
        err = ((u @ (q * torch.exp2(e)[:, None])[:, :, None])[:, :, 0] - w).pow(2).sum(1)
        best = int(err.argmin())
        out.append((best + 1, int(e[best]), q[best].long().tolist()))
    return out


def _fields(c: seedlm.SeedLMTensor) -> list[tuple[int, int, list]]:
    return [(int(s), int(e), q.long().tolist()) for s, e, q in zip(c.seeds, c.exponents, c.mantissas)]


def test_seedlm_fast_search_picks_the_exhaustive_searchs_seeds():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 40, generator=g)
    w[1] *= 0.01
    w[2] *= 0.002  # small blocks: quantisation error dominates
    w[3] *= 30.0
    w[4, :16] = 0.0  # two all-zero blocks: every seed ties, seed 1 wins
    w = w.reshape(-1)[:-3]  # padding
    for block, latent in [(8, 3), (4, 2)]:
        got = seedlm.compress(w, block=block, latent=latent, seed_bits=10, chunk=16)
        assert _fields(got) == _dense_seedlm(w, block, latent, 10), (block, latent)
    assert _fields(seedlm.compress(w, seed_bits=10))[20:22] == [(1, -8, [0, 0, 0])] * 2  # row 4's first 16
    w16 = torch.randn(4, 24, generator=g) * torch.tensor([1.0, 0.05, 0.01, 3.0])[:, None]
    assert _fields(seedlm.compress(w16)) == _dense_seedlm(w16, 8, 3, 16)  # the paper's (C, P, K)


def test_seedlm_small_blocks_take_the_tighter_bound_and_match(monkeypatch):
    calls = []
    bound = seedlm._lower_bound
    monkeypatch.setattr(seedlm, "_lower_bound", lambda fit, *rest: calls.append(fit.shape[1]) or bound(fit, *rest))
    scales = torch.tensor([1.0, 0.02, 0.005, 0.002, 0.002, 0.001, 0.003, 0.01])
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * scales[:, None]
    got = seedlm.compress(w, seed_bits=14)
    assert sum(calls) >= 2  # blocks whose least-squares bound was too loose were bounded again
    assert _fields(got) == _dense_seedlm(w, 8, 3, 14)


def test_seedlm_search_is_deterministic_across_chunks_and_threads():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 0.01
    first = _fields(seedlm.compress(w))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _fields(seedlm.compress(w, chunk=5)) == first
    finally:
        torch.set_num_threads(threads)
    assert _fields(seedlm.compress(w, chunk=1000)) == first


def test_seedlm_max_seconds_gives_up_after_the_first_chunk(monkeypatch):
    import pickle

    from coordinator.errors import AgentForgeError

    chunks = []
    search = seedlm._search
    monkeypatch.setattr(seedlm, "_search", lambda w, *rest: chunks.append(len(w)) or search(w, *rest))
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(SeedLMTooSlow) as info:
        seedlm.compress(w, seed_bits=12, chunk=16, max_seconds=1e-9)
    assert chunks == [16]  # one chunk of 16 blocks out of 16: it gave up before the rest
    err = info.value
    assert isinstance(err, AgentForgeError) and isinstance(err, TimeoutError)
    assert err.shape == (32, 64) and err.allowed_s == 1e-9 and err.projected_s > 1e-9
    assert "(32, 64)" in str(err) and "allowed" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SeedLMTooSlow and str(back) == str(err) and back.projected_s == err.projected_s
    chunks.clear()
    ok = seedlm.compress(w, seed_bits=12, chunk=16, max_seconds=1e6)
    assert len(chunks) == 16 and _fields(ok) == _fields(seedlm.compress(w, seed_bits=12))


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
