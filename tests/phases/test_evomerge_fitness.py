"""EvoMerge fitness: deterministic speed/memory measures, measured objectives, the composite."""

from __future__ import annotations

import math

import pytest
import torch

from phases.cognate import CognateConfig
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import build_model_config
from phases.data import DataConfig, load_corpus
from phases.evomerge.fitness import FITNESS_WEIGHTS, Objectives, composite, flops_per_token, measure, reference, weight_bytes

CFG = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                    memory_slots=16, memory_chunk=8, max_seq_len=64, batch_size=8, eval_batches=1, eval_tasks=4)


def test_flops_and_bytes_of_a_known_model():
    tied = torch.nn.Linear(4, 8, bias=False)
    model = torch.nn.Sequential(tied, torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert flops_per_token(model) == 2 * (32 + 32)
    assert weight_bytes(model) == (32 + 32 + 4) * 4
    shared = torch.nn.Sequential(tied, tied)
    assert weight_bytes(shared) == 32 * 4, "a tied weight counts once"


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig(seq_len=32), seed=0)


def test_measure_a_cognate_model(corpus):
    torch.manual_seed(0)
    model = CognateForCausalLM(build_model_config(CFG, corpus.tokenizer))
    tasks = corpus.heldout_tasks[:16]
    obj = measure(model, corpus, tasks, batch_size=4, max_batches=1)
    assert math.isfinite(obj.perplexity) and obj.perplexity > 1 and 0.0 <= obj.accuracy <= 1.0
    assert obj.ponder_steps >= 1
    act = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".act." in f".{n}.")
    assert act > 0 and flops_per_token(model, 3.0) - flops_per_token(model, 1.0) == pytest.approx(2 * 2 * act)
    assert measure(model, corpus, tasks, batch_size=4, max_batches=1) == obj, "deterministic"


def test_composite_weights_and_normalisation():
    ref = Objectives(perplexity=10.0, accuracy=0.2, flops_per_token=100.0, weight_bytes=1000)
    fit, terms = composite(ref, ref)
    assert terms == {"perplexity": 1.0, "accuracy": 0.2, "speed": 1.0, "memory": 1.0}
    assert fit == pytest.approx(0.4 + 0.3 * 0.2 + 0.2 + 0.1)
    better = Objectives(perplexity=8.0, accuracy=0.3, flops_per_token=100.0, weight_bytes=1000)
    assert composite(better, ref)[0] == pytest.approx(0.4 * 1.25 + 0.3 * 0.3 + 0.3)
    assert sum(FITNESS_WEIGHTS.values()) == pytest.approx(1.0)
    mean = reference([ref, better])
    assert mean.perplexity == 9.0 and mean.accuracy == pytest.approx(0.25)
    with pytest.raises(ValueError):
        reference([])
