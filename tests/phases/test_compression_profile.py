"""Phase 8 profiler: latency percentiles, allocator peak memory, bytes on disk, ratios."""

from __future__ import annotations

import os
import types

import pytest
import torch

from coordinator.errors import ArtifactError
from phases.cognate import CognateForCausalLM, CognateModelConfig
from phases.compression.profile import Profile, bytes_on_disk, compare, peak_forward_memory, profile_model


def _model():
    torch.manual_seed(0)
    return CognateForCausalLM(CognateModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, memory_slots=16,
                                                 memory_chunk_size=8))


class _Allocates(torch.nn.Module):
    """Allocates 4,000 then 8,000 bytes (both live), frees the first, allocates 2,000: peak 12,000."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, input_ids):
        a = torch.ones(1000)
        b = torch.ones(2000)
        del a
        c = torch.ones(500)
        del c
        return types.SimpleNamespace(logits=b)


def test_peak_memory_is_the_allocator_high_water_mark():
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert peak_forward_memory(_Allocates(), ids) == 12_000
    prof = profile_model(_Allocates(), ids, warmup=0, repeats=3)
    assert prof.peak_memory_bytes == 12_000 and prof.parameter_bytes == 12


def test_profile_a_cognate_model():
    model = _model().train()
    threads = torch.get_num_threads()
    ids = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    prof = profile_model(model, ids, warmup=1, repeats=5)
    assert model.training and torch.get_num_threads() == threads, "mode and threads are left as they were"
    assert prof.latency_ms_p95 >= prof.latency_ms_p50 > 0 and prof.latency_ms_mean > 0
    assert prof.tokens_per_s == pytest.approx(2 * 16 / (prof.latency_ms_mean / 1e3))
    assert (prof.batch, prof.seq_len, prof.repeats, prof.threads) == (2, 16, 5, threads)
    assert prof.parameter_bytes == sum(p.numel() * 4 for p in model.parameters())
    logits_bytes = 2 * 16 * 258 * 4
    assert prof.peak_memory_bytes >= logits_bytes, "the logits are allocated during the forward and still live"
    bigger = profile_model(model, torch.zeros(8, 16, dtype=torch.long), warmup=0, repeats=1)
    assert bigger.peak_memory_bytes > prof.peak_memory_bytes
    assert set(prof.to_json()) >= {"latency_ms_p50", "latency_ms_p95", "tokens_per_s", "peak_memory_bytes"}
    with pytest.raises(ValueError, match="batch, seq_len"):
        profile_model(model, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="repeats"):
        profile_model(model, ids, repeats=0)


def test_bytes_on_disk(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 23)
    (tmp_path / "sub" / "deeper" / "c").write_bytes(b"z" * 7)
    os.symlink(tmp_path / "a.bin", tmp_path / "sub" / "link")
    assert bytes_on_disk(tmp_path) == 130, "symlinks are not counted twice"
    assert bytes_on_disk(tmp_path / "a.bin") == 100
    assert bytes_on_disk(str(tmp_path / "sub")) == 30
    with pytest.raises(ArtifactError, match="no such file"):
        bytes_on_disk(tmp_path / "missing")


def _profile(p50, tps, peak, params):
    return Profile(latency_ms_p50=p50, latency_ms_p95=p50, latency_ms_mean=p50, tokens_per_s=tps,
                   peak_memory_bytes=peak, parameter_bytes=params, batch=1, seq_len=8, repeats=1, threads=1)


def test_compare_ratios():
    profiles = {"input": _profile(10.0, 800.0, 4000, 1000), "int8": _profile(5.0, 1600.0, 1000, 250)}
    ratios = compare(profiles, "input")
    assert ratios["input"] == {"latency_ratio": 1.0, "throughput_ratio": 1.0, "memory_ratio": 1.0,
                               "parameter_bytes_ratio": 1.0}
    assert ratios["int8"] == {"latency_ratio": 0.5, "throughput_ratio": 2.0, "memory_ratio": 0.25,
                              "parameter_bytes_ratio": 0.25}
    with pytest.raises(KeyError, match="input, int8"):
        compare(profiles, "fp16")
