"""Phase 8 validator: held-out quality, retention, output parity and the quality gate."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from coordinator.errors import ConfigError
from phases.cognate import CognateForCausalLM, CognateModelConfig
from phases.compression.evaluate import Quality, QualityGate, measure_quality, output_parity, retention
from phases.data import DataConfig, evaluate_perplexity, load_corpus


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig(seq_len=32), seed=0)


@pytest.fixture(scope="module")
def model(corpus):
    """A tiny Cognate model trained a few steps, so its token accuracy is well above 0."""
    torch.manual_seed(0)
    m = CognateForCausalLM(CognateModelConfig(vocab_size=corpus.tokenizer.vocab_size, hidden_size=32,
                                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                              memory_slots=16, memory_chunk_size=8))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    for step in range(15):
        x = corpus.batch(step, 8, 32, seed=0)  # (B, T+1)
        loss = F.cross_entropy(m(input_ids=x[:, :-1]).logits.transpose(1, 2), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _noisy(model, std, seed=1):
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return noisy


def test_measure_quality_counts_every_position_and_matches_evaluate_perplexity(corpus, model):
    model.train()
    q = measure_quality(model, corpus, batch_size=4, max_batches=2)
    assert model.training, "the caller's mode is restored"
    windows = corpus.windows("heldout", max_windows=8)
    assert q.tokens == windows.shape[0] * (windows.shape[1] - 1) == 8 * 32
    assert q.task_accuracy is None and q.tasks == 0
    assert q.perplexity == pytest.approx(evaluate_perplexity(model, corpus, batch_size=4, max_batches=2), rel=1e-9)
    with torch.no_grad():
        model.eval()
        pred = model(input_ids=windows[:, :-1]).logits.argmax(-1)
    assert q.token_accuracy == pytest.approx(float((pred == windows[:, 1:]).double().mean()), abs=1e-12)
    assert q.token_accuracy > 0.1, "the fixture model learned something"
    assert measure_quality(model, corpus, batch_size=4, max_batches=2) == q, "deterministic"
    with_tasks = measure_quality(model, corpus, batch_size=4, max_batches=2, tasks=corpus.heldout_tasks[:8])
    assert with_tasks.tasks == 8 and 0.0 <= with_tasks.task_accuracy <= 1.0
    assert set(q.to_json()) == {"token_accuracy", "perplexity", "tokens", "task_accuracy", "tasks"}
    with pytest.raises(ValueError, match="batch_size"):
        measure_quality(model, corpus, batch_size=0)


def test_a_model_against_itself_retains_exactly_everything(corpus, model):
    a = measure_quality(model, corpus, batch_size=4, max_batches=2)
    b = measure_quality(copy.deepcopy(model), corpus, batch_size=4, max_batches=2)
    ret = retention(b, a)
    assert ret == {"retention": 1.0, "perplexity_ratio": 1.0, "task_retention": None}
    ids = corpus.windows("heldout", max_windows=4)[:, :-1]
    parity = output_parity(model, copy.deepcopy(model), ids)
    assert parity == {"max_abs_diff": 0.0, "top1_agreement": 1.0, "kl_mean": 0.0}
    assert QualityGate(min_retention=1.0, max_perplexity_ratio=1.0, min_top1_agreement=1.0).verdict(ret, parity) == (True, [])


def test_noise_in_the_weights_lowers_retention_and_parity(corpus, model):
    ref = measure_quality(model, corpus, batch_size=4, max_batches=2)
    noisy = _noisy(model, std=0.1)
    cand = measure_quality(noisy, corpus, batch_size=4, max_batches=2)
    ret = retention(cand, ref)
    assert ret["retention"] < 1.0 and ret["perplexity_ratio"] > 1.0
    parity = output_parity(model, noisy, corpus.windows("heldout", max_windows=4)[:, :-1])
    assert parity["top1_agreement"] < 1.0 and parity["max_abs_diff"] > 0 and parity["kl_mean"] > 0
    passed, reasons = QualityGate(min_retention=0.999, min_top1_agreement=0.999).verdict(ret, parity)
    assert not passed and len(reasons) == 2
    assert reasons[0].startswith("retention ") and "< min_retention 0.999" in reasons[0]
    assert reasons[1].startswith("top1_agreement ") and "< min_top1_agreement 0.999" in reasons[1]


def test_output_parity_golden_values():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits)

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=self.logits)

    a = torch.tensor([[[0.0, math.log(3.0)], [1.0, 0.0]]])  # p = (1/4, 3/4); argmax 1, 0
    b = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])  # q = (1/2, 1/2); argmax 0 (ties: first), 1
    ids = torch.zeros(1, 2, dtype=torch.long)
    parity = output_parity(Fixed(a), Fixed(b), ids)
    e = math.e
    p1, q1 = (e / (1 + e), 1 / (1 + e)), (1 / (1 + e**2), e**2 / (1 + e**2))
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = sum(p * math.log(p / q) for p, q in zip(p1, q1))
    assert parity["max_abs_diff"] == pytest.approx(2.0)
    assert parity["top1_agreement"] == 0.0
    assert parity["kl_mean"] == pytest.approx((kl0 + kl1) / 2, rel=1e-6)  # float32 logits
    with pytest.raises(ValueError, match="do not line up"):
        output_parity(Fixed(a), Fixed(torch.zeros(1, 2, 3)), ids)


def test_retention_math():
    ref = Quality(token_accuracy=0.5, perplexity=10.0, tokens=100, task_accuracy=0.4, tasks=10)
    cand = Quality(token_accuracy=0.45, perplexity=12.5, tokens=100, task_accuracy=0.3, tasks=10)
    assert retention(cand, ref) == pytest.approx({"retention": 0.9, "perplexity_ratio": 1.25, "task_retention": 0.75})
    no_tasks = Quality(token_accuracy=0.45, perplexity=12.5, tokens=100)
    assert retention(no_tasks, ref)["task_retention"] is None
    zero_tasks = Quality(token_accuracy=0.5, perplexity=10.0, tokens=100, task_accuracy=0.0, tasks=10)
    assert retention(cand, zero_tasks)["task_retention"] is None
    with pytest.raises(ValueError, match="token_accuracy is 0"):
        retention(cand, Quality(token_accuracy=0.0, perplexity=10.0, tokens=100))


def test_gate_verdict_and_reasons():
    gate = QualityGate()
    assert gate.min_retention == 0.95 and gate.max_perplexity_ratio is None and gate.min_top1_agreement is None
    assert gate.verdict({"retention": 0.95, "perplexity_ratio": 9.0}) == (True, [])
    assert gate.verdict({"retention": 0.931, "perplexity_ratio": 1.0}) == (False, ["retention 0.931 < min_retention 0.95"])
    strict = QualityGate(min_retention=0.9, max_perplexity_ratio=1.1, min_top1_agreement=0.8)
    passed, reasons = strict.verdict({"retention": 0.8, "perplexity_ratio": 1.25}, {"top1_agreement": 0.5})
    assert not passed and reasons == ["retention 0.8 < min_retention 0.9",
                                      "perplexity_ratio 1.25 > max_perplexity_ratio 1.1",
                                      "top1_agreement 0.5 < min_top1_agreement 0.8"]
    passed, reasons = strict.verdict({"retention": 0.95, "perplexity_ratio": 1.0}, None)
    assert not passed and reasons == ["min_top1_agreement 0.8 is set but output parity was not measured"]
    passed, reasons = gate.verdict({"retention": float("nan"), "perplexity_ratio": 1.0})
    assert not passed and reasons == ["retention nan is not finite (min_retention 0.95)"]
    with pytest.raises(ConfigError, match="min_retention"):
        QualityGate(min_retention=1.5)
    with pytest.raises(ConfigError, match="unknown key"):
        QualityGate(min_accuracy=0.9)
