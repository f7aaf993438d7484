"""Phase 6's measured optimisers (phases/baking/graph.py, accelerate.py, memory.py, hardware.py) on tiny
Cognate models: rewrites keep the logits, batched decoding keeps the tokens, checkpointing keeps the
gradients, and every decision comes with a measured reason (no timing thresholds are asserted)."""

from __future__ import annotations

import copy

import pytest
import torch

from phases.baking.accelerate import greedy_batch, kv_cache_support, left_padding_exact, measure_acceleration
from phases.baking.graph import REWRITES, UnitRMSNorm, apply_rewrites, fold_norms, fuse_qkv, load_optimized, \
    measure_rewrites
from phases.baking.hardware import apply_target, choose_target, thread_counts
from phases.baking.memory import activation_bytes, checkpointing_needed, disable_checkpointing, \
    enable_checkpointing, measure_memory
from phases.bitnet.quant import BitLinear, replace_linears
from phases.cognate.modeling import CognateAttention, CognateRMSNorm
from tests.phases.tiny_cognate import tiny_cognate

EOS, PAD = 256, 257


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed: int = 0, **kw):
    """A tiny Cognate whose norm gains and memory output are not at their (trivially foldable) init."""
    model = tiny_cognate(seed, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CognateRMSNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
        model.model.memory.o_proj.weight.copy_(0.5 * torch.randn(model.model.memory.o_proj.weight.shape,
                                                                 generator=gen))
    return model


def _ids(batch: int = 2, seq: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


# -- graph rewrites ------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory", [False, True])
def test_fuse_qkv_removes_the_three_projections_and_keeps_the_logits(memory):
    model, ids = _model(memory_enabled=memory), _ids()
    fused = copy.deepcopy(model)
    assert fuse_qkv(fused) == 2  # layers[0].attn and the pondered block's attn
    attns = [m for m in fused.modules() if isinstance(m, CognateAttention)]
    assert len(attns) == 2
    for attn in attns:
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert attn.qkv_proj.weight.shape == (96, 32)
    assert not any(k.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight"))
                   for k in fused.state_dict() if ".attn." in k)
    torch.testing.assert_close(_logits(fused, ids), _logits(model, ids), atol=1e-5, rtol=0)
    assert fuse_qkv(fused) == 0  # already fused


@pytest.mark.parametrize("sub_norm", [False, True])
def test_fold_norms_folds_every_gain_and_keeps_the_logits(sub_norm):
    model, ids = _model(sub_norm=sub_norm, memory_enabled=True), _ids()
    folded = copy.deepcopy(model)
    assert fuse_qkv(folded) == 2
    # per block: input_norm, post_attn_norm (+ both SubLN norms); plus the final norm
    assert fold_norms(folded) == 2 * (4 if sub_norm else 2) + 1
    assert not any(isinstance(m, CognateRMSNorm) for m in folded.modules())
    assert isinstance(folded.model.norm, UnitRMSNorm)
    torch.testing.assert_close(_logits(folded, ids), _logits(model, ids), atol=1e-4, rtol=0)
    assert fold_norms(folded) == 0


def test_fold_norms_skips_bitlinear_consumers_and_tied_heads():
    model, ids = _model(), _ids()
    replace_linears(model)  # every Linear but lm_head becomes a BitLinear
    reference = _logits(model, ids)
    assert fuse_qkv(model) == 0  # BitLinear projections are never fused
    assert fold_norms(model) == 1  # only model.norm -> lm_head (a plain Linear)
    assert isinstance(model.model.layers[0].input_norm, CognateRMSNorm)
    assert isinstance(model.model.layers[0].attn.q_proj, BitLinear)
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-4, rtol=0)

    tied = _model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    embed = tied.model.embed_tokens.weight.detach().clone()
    assert fold_norms(tied) == 4  # the two blocks' norms, not the final norm (its consumer is tied)
    assert isinstance(tied.model.norm, CognateRMSNorm)
    assert torch.equal(tied.model.embed_tokens.weight, embed)


def test_load_optimized_reapplies_the_rewrites_to_the_saved_weights(tmp_path):
    model, ids = _model(memory_enabled=True), _ids()
    model.save_pretrained(tmp_path)
    loaded = load_optimized(tmp_path, ["fuse_qkv", "fold_norms"])
    assert not loaded.training and hasattr(loaded.model.layers[0].attn, "qkv_proj")
    assert isinstance(loaded.model.layers[0].input_norm, UnitRMSNorm)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-4, rtol=0)
    with pytest.raises(KeyError, match="fuse_qkv"):
        load_optimized(tmp_path, ["nope"])
    with pytest.raises(KeyError, match="valid names"):
        apply_rewrites(model, ["fuse_qkv", "nope"])


def test_measure_rewrites_reports_parity_and_refuses_an_unreachable_speedup():
    model, ids = _model(), _ids(1, 12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_rewrites(model, ids, repeats=2, min_speedup=1e9)
    for key in (*REWRITES, "all"):
        entry = result[key]
        assert entry["parity"] and entry["max_abs_diff"] <= 1e-4 and entry["top1_agreement"] == 1.0
        assert entry["before_ms_p50"] > 0 and entry["after_ms_p50"] > 0
        assert entry["speedup"] == pytest.approx(entry["before_ms_p50"] / entry["after_ms_p50"])
        assert entry["applied"] is False and "min_speedup" in entry["reason"]
    assert result["all"]["counts"] == {"fuse_qkv": 2, "fold_norms": 5}
    assert result["chosen"] == [] and result["reason"]
    assert model.state_dict().keys() == state.keys()  # the measured model is left as it was
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# -- inference acceleration ----------------------------------------------------------------------------

@torch.no_grad()
def _greedy_alone(model, prompt, max_new, stop=None):
    x, new = torch.tensor([prompt]), []
    for _ in range(max_new):
        token = int(model(input_ids=x).logits[0, -1].argmax())
        if token == EOS:
            break
        new.append(token)
        x = torch.cat([x, torch.tensor([[token]])], dim=1)
        if stop is not None and stop(new):
            break
    return new


_PROMPTS = [_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 5, 9, 14, 1)]


@pytest.mark.parametrize("memory", [False, True])
def test_greedy_batch_gives_the_tokens_of_decoding_each_prompt_alone(memory):
    model = _model(memory_enabled=memory, memory_chunk_size=4)
    stop = lambda new: len(new) >= 2 and new[-1] == new[-2]  # noqa: E731 - a row-specific early stop
    want = [_greedy_alone(model, p, 8) for p in _PROMPTS]
    assert greedy_batch(model, _PROMPTS, 8, eos_id=EOS, pad_id=PAD) == want
    want_stop = [_greedy_alone(model, p, 8, stop) for p in _PROMPTS]
    assert greedy_batch(model, _PROMPTS, 8, eos_id=EOS, pad_id=PAD, stop=stop) == want_stop
    # eos ends a row without being returned: make the first greedy token of every prompt the eos
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(258))
    with torch.no_grad():
        model.lm_head.bias[EOS] = 1e4
    assert greedy_batch(model, _PROMPTS, 8, eos_id=EOS, pad_id=PAD) == [[] for _ in _PROMPTS]
    assert greedy_batch(model, _PROMPTS, 0, eos_id=EOS, pad_id=PAD) == [[] for _ in _PROMPTS]
    with pytest.raises(ValueError, match="non-empty"):
        greedy_batch(model, [[1], []], 2, eos_id=EOS, pad_id=PAD)


@pytest.mark.parametrize("memory", [False, True])
def test_left_padding_is_exact_only_without_the_memory(memory):
    model = _model(memory_enabled=memory, memory_chunk_size=4)
    prompt = _PROMPTS[4]
    padded = torch.tensor([[PAD] * 3 + prompt])
    mask = torch.tensor([[0] * 3 + [1] * len(prompt)])
    diff = float((_logits(model, torch.tensor([prompt]))
                  - model(input_ids=padded, attention_mask=mask).logits.detach()[:, 3:]).abs().max())
    exact, reason = left_padding_exact(model)
    assert exact is (not memory) and reason
    if memory:  # the reason the memory model is batched by equal length only
        assert diff > 1e-3 and "chunk" in reason
    else:
        assert diff < 1e-4


def test_kv_cache_support_and_measurement_on_an_hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    supported, reason = kv_cache_support(tiny_cognate())
    assert supported is False and "pondering" in reason
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=258, n_positions=64,
                                      bos_token_id=EOS, eos_token_id=EOS)).eval()
    assert kv_cache_support(gpt2)[0] is True
    result = measure_acceleration(gpt2, _PROMPTS[:3], 4, eos_id=EOS, pad_id=PAD, batch_size=2, compile=False,
                                  repeats=1, min_speedup=1e9)
    kv = result["kv_cache"]
    assert kv["supported"] and kv["parity"] and kv["cache_s"] > 0 and kv["no_cache_s"] > 0
    assert kv["applied"] is False and "min_speedup" in kv["reason"]
    assert result["batching"]["parity"]  # HF model: left padding with explicit position ids is exact too


@pytest.mark.parametrize("memory", [False, True])
def test_measure_acceleration_refuses_an_unreachable_speedup(memory, monkeypatch):
    model = _model(memory_enabled=memory, memory_chunk_size=4)
    if memory:  # a compiler that cannot run here is recorded, not raised
        def broken(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        monkeypatch.setattr(torch, "compile", broken)
    result = measure_acceleration(model, _PROMPTS, 3, eos_id=EOS, pad_id=PAD, batch_size=4, repeats=1,
                                  min_speedup=1e9, compile_backend="eager", compile_repeats=2)
    batching = result["batching"]
    assert batching["parity"] and batching["new_tokens"] > 0 and batching["speedup"] > 0
    assert batching["left_padding"]["applicable"] is (not memory)
    assert batching["applied"] is False and "min_speedup" in batching["reason"]
    assert result["kv_cache"] == {"supported": False, "reason": kv_cache_support(model)[1], "applied": False}
    comp = result["compile"]
    assert comp["applied"] is False
    if memory:
        assert comp["available"] is False and "no C++ compiler found" in comp["reason"]
    else:
        assert comp["available"] and comp["parity"] and comp["compile_s"] > 0 and "min_speedup" in comp["reason"]


# -- memory --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory", [False, True])
def test_checkpointing_cuts_saved_activations_and_keeps_the_gradients(memory):
    model, ids = _model(memory_enabled=memory), _ids(2, 24)
    plain = activation_bytes(model, ids, checkpointing=False)
    ckpt = activation_bytes(model, ids, checkpointing=True)
    assert 0 < ckpt < plain
    assert not model.training and "forward" not in model.model.layers[0].__dict__  # state restored

    def grads(m):
        m.train()
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    reference = grads(model)
    assert enable_checkpointing(model) == 2  # layers[0] and the pondered block (model.act.block)
    assert "forward" in model.model.act.block.__dict__
    assert enable_checkpointing(model) == 2  # idempotent
    checkpointed = grads(model)
    assert checkpointed.keys() == reference.keys()
    for name, g in reference.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert disable_checkpointing(model) == 2 and "forward" not in model.model.act.block.__dict__
    assert checkpointing_needed(plain, plain // 2) and not checkpointing_needed(plain, plain * 2)
    with pytest.raises(ValueError, match="budget"):
        checkpointing_needed(plain, 0)


def test_measure_memory_decides_tying_and_tabulates_dtypes():
    model, ids = _model(), _ids(2, 16)
    with torch.no_grad():  # confident embeddings and a near-uniform head: tying to them hurts the loss
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.mul_(0.01)
    result = measure_memory(model, ids, budget_bytes=1, repeats=1)
    tie = result["weight_tying"]
    assert tie["already_tied"] is False and tie["bytes_saved"] == 258 * 32 * 4
    assert tie["relative_loss_increase"] > 0.01 and tie["applied"] is False and tie["reason"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # decided on a copy

    ckpt = result["checkpointing"]
    assert ckpt["activation_bytes_with"] < ckpt["activation_bytes_without"] and ckpt["parity"]
    assert ckpt["needed"] is True and ckpt["applied"] is True  # a 1-byte budget is exceeded

    dtypes = result["dtype"]
    assert set(dtypes["dtypes"]) == {"float32", "bfloat16", "float16"}
    assert dtypes["dtypes"]["float32"]["top1_agreement"] == 1.0
    assert dtypes["dtypes"]["bfloat16"]["weight_bytes"] * 2 == dtypes["dtypes"]["float32"]["weight_bytes"]
    assert dtypes["chosen"] in dtypes["dtypes"]
    assert dtypes["dtypes"][dtypes["chosen"]]["top1_agreement"] >= 0.99

    with torch.no_grad():  # a head equal to the embeddings: tying changes nothing and saves its bytes
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    again = measure_memory(model, ids, repeats=1, min_agreement=0.0)
    assert again["weight_tying"]["applied"] is True
    assert again["weight_tying"]["relative_loss_increase"] == pytest.approx(0.0, abs=1e-6)
    assert again["checkpointing"]["applied"] is False and "budget" in again["checkpointing"]["reason"]
    assert again["dtype"]["chosen"] in ("bfloat16", "float16")  # any agreement is enough: the smallest wins
    tied = measure_memory(_model(tie_word_embeddings=True), ids, repeats=1)["weight_tying"]
    assert tied["already_tied"] is True and tied["applied"] is False


# -- hardware ------------------------------------------------------------------------------------------

def test_choose_target_records_every_measurement_and_restores_threads():
    model, ids = _model(), _ids(1, 12)
    threads = torch.get_num_threads()
    assert thread_counts(1) == [1] and thread_counts(6) == [1, 2, 4, 6]
    target = choose_target(model, ids, repeats=2, max_threads=2)
    assert torch.get_num_threads() == threads
    assert target["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert target["torch_version"] == torch.__version__ and target["cpu_count"] >= 1
    assert target["dtype"] in target["dtypes"] and target["dtypes"][target["dtype"]]["ok"]
    assert target["dtypes"][target["dtype"]]["top1_agreement"] >= 0.99 and target["dtype_reason"]
    assert target["dtypes"]["float32"]["top1_agreement"] == 1.0
    if target["device"] == "cpu":
        assert set(target["dtypes"]) == {"float32", "bfloat16"} and target["cuda_device_name"] is None
        assert sorted(target["threads"]) == ["1", "2"] and str(target["num_threads"]) in target["threads"]
        assert all(t["latency_ms_p50"] > 0 for t in target["threads"].values())
    fast = min((n for n, d in target["dtypes"].items() if d["ok"] and d["top1_agreement"] >= 0.99),
               key=lambda n: target["dtypes"][n]["latency_ms_p50"])
    assert target["dtype"] == fast
    try:
        moved = apply_target(copy.deepcopy(model), target)
        assert next(moved.parameters()).dtype == getattr(torch, target["dtype"])
        if target["device"] == "cpu":
            assert torch.get_num_threads() == target["num_threads"]
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="dtype"):
        apply_target(model, {"device": "cpu", "dtype": "float12"})
