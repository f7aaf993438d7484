"""Phase 7 (ADAS) backends and measurements: every combination this machine supports builds an
artifact, reloads from it and matches the fp32 torch model (to float rounding, or within bounds
measured for the lossy precisions); a fixed-length ONNX graph pads shorter inputs exactly; the
latency, memory and accuracy measurements count what they say."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

from coordinator.errors import ArtifactError, ConfigError, PhaseError
from phases.adas import measure, runtime
from phases.bitnet.quant import replace_linears
from phases.compression.export import tensorrt_status
from phases.compression.profile import bytes_on_disk
from tests.phases.tiny_cognate import tiny_cognate

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch, seq, seed=0):
    return torch.randint(0, 258, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    m = tiny_cognate(seed=0)
    with torch.no_grad():  # halting that differs per token, so ACT's weights matter
        m.model.act.halt.weight.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def ids():
    return _ids(4, 24)


@pytest.fixture(scope="module")
def reference(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def runners(model, tmp_path_factory):
    """Each supported eager / onnxruntime combination, built once for the module."""
    out = {}
    for backend, precision in [("eager", "fp32"), ("eager", "fp16"), ("eager", "bf16"), ("eager", "int8"),
                               ("eager", "ternary"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]:
        assert runtime.unsupported(backend, precision) is None, (backend, precision)
        out[backend, precision] = runtime.build_runner(
            model, backend=backend, precision=precision, threads=1, seq_len=16,
            work_dir=tmp_path_factory.mktemp(f"{backend}-{precision}"))
    return out


# (max abs diff, min argmax agreement) vs the fp32 model on ids (4, 24), logits of scale ~0.44.
# Measured on this seed: fp16 4e-4 / 0.99, bf16 4e-3 / 0.96, int8 8e-3 / 0.93, ONNX int8
# 3e-2 / 0.95. A random tiny model's logits are close together, so argmax flips easily.
BOUNDS = {("eager", "fp32"): (1e-4, 1.0), ("onnxruntime", "fp32"): (1e-4, 1.0),
          ("eager", "fp16"): (2e-3, 0.95), ("eager", "bf16"): (1e-2, 0.9),
          ("eager", "int8"): (3e-2, 0.85), ("onnxruntime", "int8"): (0.1, 0.85)}


@pytest.mark.parametrize("combo", list(BOUNDS), ids="-".join)
def test_built_artifact_reloads_and_matches_the_fp32_model(runners, combo, ids, reference):
    built = runners[combo]
    again = runtime.load_runner(built.artifact_dir)  # the deployer's reload check
    meta = json.loads((built.artifact_dir / runtime.RUNTIME_FILE).read_text())
    assert (meta["backend"], meta["precision"], meta["threads"], meta["seq_len"]) == (*combo, 1, 16)
    assert sorted(p.name for p in built.artifact_dir.iterdir()) == sorted(built.files) == sorted(meta["files"])
    assert built.bytes_on_disk == sum((built.artifact_dir / f).stat().st_size for f in built.files)
    assert built.bytes_on_disk == bytes_on_disk(built.artifact_dir) == again.bytes_on_disk
    assert built.build_s > 0 and built.fixed_seq is None
    max_abs, min_agree = BOUNDS[combo]
    for runner in (built, again):
        out = runner.logits(ids)
        assert out.dtype == torch.float32 and out.shape == reference.shape
        p = measure.parity(runner, reference, ids)
        assert p["max_abs_diff"] <= max_abs and p["argmax_agreement"] >= min_agree, (combo, p)
    assert torch.equal(built.logits(ids), again.logits(ids))


def test_artifact_files_per_precision(runners):
    files = {combo: set(r.files) for combo, r in runners.items()}
    assert {"model.safetensors", "config.json", "runtime.json"} <= files["eager", "fp32"]
    assert files["eager", "ternary"] == {"bitnet.json", "bitnet.safetensors", "config.json", "runtime.json"}
    assert files["onnxruntime", "fp32"] == {"model.onnx", "runtime.json"}
    assert files["onnxruntime", "int8"] == {"model.int8.onnx", "runtime.json"}  # no fp32 intermediate left
    size = {combo: r.bytes_on_disk for combo, r in runners.items()}
    assert size["onnxruntime", "int8"] < size["onnxruntime", "fp32"]
    assert size["eager", "fp16"] < 0.6 * size["eager", "fp32"] and size["eager", "bf16"] < 0.6 * size["eager", "fp32"]
    assert size["eager", "ternary"] < size["eager", "fp16"]
    # eager int8 stores the fp32 dir and quantizes at load: its bytes on disk are the fp32 ones
    meta = json.loads((runners["eager", "int8"].artifact_dir / "runtime.json").read_text())
    assert "int8 dynamic at load" in meta["note"]
    assert abs(size["eager", "int8"] - size["eager", "fp32"]) < 1024


def test_ternary_matches_the_model_after_replace_linears(runners, model, ids):
    runner = runners["eager", "ternary"]
    qat = copy.deepcopy(model)
    replace_linears(qat)
    qat.eval()
    with torch.no_grad():
        want = qat(input_ids=ids).logits
    assert (runner.logits(ids) - want).abs().max() <= 1e-5
    again = runtime.load_runner(runner.artifact_dir)
    assert (again.logits(ids) - want).abs().max() <= 1e-5
    meta = json.loads((runner.artifact_dir / "runtime.json").read_text())
    assert meta["ternarised_here"] is True and meta["kernel"] in ("int8", "decode")


def test_fixed_length_graph_pads_shorter_inputs_exactly(tmp_path):
    model = tiny_cognate(seed=4, memory_enabled=True)
    with torch.no_grad():
        model.model.memory.o_proj.weight.normal_(0, 0.1)  # the untrained memory adds nothing
    runner = runtime.build_runner(model, backend="onnxruntime", precision="fp32", threads=1, seq_len=20,
                                  work_dir=tmp_path / "mem")
    assert runner.fixed_seq == 20 and runner.pad_id == model.config.pad_token_id
    for seq in (20, 13, 3):  # 13: a partial memory chunk (chunk 8) before the padding
        ids = _ids(2, seq, seed=seq)
        with torch.no_grad():
            want = model(input_ids=ids).logits  # the torch model on the short input, no padding
        got = runner.logits(ids)
        assert got.shape == (2, seq, 258) and (got - want).abs().max() < 1e-4, seq
    with pytest.raises(ValueError, match="21.*20"):
        runner.logits(_ids(1, 21))
    with pytest.raises(ValueError, match="fixed sequence length 20"):
        measure.token_latency(runner, _ids(1, 15), 6)


def test_unsupported_reasons_and_unknown_names(tmp_path, model):
    assert runtime.unsupported("tensorrt", "fp16") == tensorrt_status()
    if tensorrt_status().startswith("skipped"):
        assert "not installed" in runtime.unsupported("tensorrt", "fp32")
    assert "fp16" in runtime.unsupported("onnxruntime", "fp16")
    assert runtime.unsupported("compile", "ternary") is not None
    if not torch.cuda.is_available():
        assert runtime.unsupported("eager", "fp32", device="cuda") == "no CUDA device"
    for kwargs, valid in [({"backend": "tvm", "precision": "fp32"}, "eager, compile"),
                          ({"backend": "eager", "precision": "int4"}, "fp32, fp16"),
                          ({"backend": "eager", "precision": "fp32", "device": "tpu"}, "cpu, cuda")]:
        with pytest.raises(ValueError, match=valid):
            runtime.unsupported(**kwargs)
    with pytest.raises(PhaseError, match="tensorrt"):
        runtime.build_runner(model, backend="tensorrt", precision="fp32", threads=1, seq_len=8, work_dir=tmp_path / "t")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        runtime.build_runner(model, backend="eager", precision="fp32", threads=1, seq_len=8, work_dir=tmp_path / "busy")


def test_load_runner_refuses_incomplete_artifacts(runners, tmp_path):
    with pytest.raises(ArtifactError, match="runtime.json"):
        runtime.load_runner(tmp_path)
    meta = json.loads((runners["eager", "fp32"].artifact_dir / "runtime.json").read_text())
    (tmp_path / "runtime.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="missing: config.json"):
        runtime.load_runner(tmp_path)


def test_threads_are_set_during_a_call_and_restored(model, tmp_path, ids):
    runner = runtime.build_runner(model, backend="eager", precision="fp32", threads=2, seq_len=8,
                                  work_dir=tmp_path / "r")
    seen = []
    runner.module.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    assert torch.get_num_threads() == 1
    runner.logits(ids[:1, :4])
    assert seen == [2] and torch.get_num_threads() == 1


class _Counting:
    """A runner that counts calls and records the context lengths it was given."""

    def __init__(self, runner):
        self.runner, self.fixed_seq, self.lengths = runner, runner.fixed_seq, []

    def logits(self, ids):
        self.lengths.append(ids.shape[1])
        return self.runner.logits(ids)


def test_call_latency_times_only_the_repeats(runners, ids):
    counting = _Counting(runners["onnxruntime", "fp32"])
    stats = measure.call_latency(counting, ids[:1, :8], warmup=2, repeats=5)
    assert len(counting.lengths) == 7 and stats["n"] == 5 and len(stats["samples_ms"]) == 5
    assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert stats["max"] == max(stats["samples_ms"])
    with pytest.raises(ValueError, match="repeats"):
        measure.call_latency(counting, ids, repeats=0)


def test_token_latency_decodes_greedily_without_cache(runners, model):
    counting = _Counting(runners["eager", "fp32"])
    prompt = _ids(2, 3, seed=5)
    stats = measure.token_latency(counting, prompt, 4, warmup=1, repeats=2)
    assert counting.lengths == [3, 4, 5, 6] * 3  # every step re-reads the whole context
    assert stats["n"] == 8 and len(stats["samples_ms"]) == 8 and stats["tokens"] == 8
    assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"] and stats["tokens_per_s"] > 0


def test_percentiles_match_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 7.5]
    got = measure.percentiles(xs)
    assert got["n"] == 7 and got["max"] == 10.0 and got["mean"] == pytest.approx(np.mean(xs))
    for q in (50, 95, 99):
        assert got[f"p{q}"] == pytest.approx(np.percentile(xs, q))
    assert got["p50"] == 4.0 and got["p95"] == pytest.approx(9.25)  # linear: 7.5 + 0.7 * 2.5
    with pytest.raises(ValueError):
        measure.percentiles([])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_rss_growth_sees_an_allocation(tmp_path, monkeypatch):
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("/proc/self/clear_refs is not writable here")
    mib = 1 << 20
    array, grown = measure.peak_rss_growth(lambda: np.ones(64 * mib // 8))  # 64 MiB, touched
    assert array.nbytes == 64 * mib
    assert 60 * mib <= grown <= 80 * mib, grown / mib
    del array
    monkeypatch.setattr(measure, "_CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    assert measure.peak_rss_growth(lambda: 7) == (7, None)


def test_token_accuracy_counts_every_position(runners, model):
    # windows the model itself decodes greedily are all correct; then corrupt some targets
    n, t = 7, 10
    windows = _ids(n, 1, seed=9)
    with torch.no_grad():
        for _ in range(t):
            windows = torch.cat([windows, model(input_ids=windows).logits[:, -1].argmax(-1, keepdim=True)], 1)
    runner = runners["eager", "fp32"]
    assert measure.token_accuracy(runner, windows, batch_size=3) == 1.0
    bad = windows.clone()
    bad[:3, -1] = (bad[:3, -1] + 1) % 258  # the last target of 3 windows
    assert measure.token_accuracy(runner, bad, batch_size=3) == pytest.approx(1 - 3 / (n * t))
    with pytest.raises(ValueError, match="windows"):
        measure.token_accuracy(runner, windows[:, :1])


@pytest.mark.slow
def test_compile_backend_matches_eager_across_shapes(model, tmp_path):
    """torch.compile takes ~10-50 s on one thread here; the default run's sibling is
    test_built_artifact_reloads_and_matches_the_fp32_model (the same artifact, eager)."""
    assert runtime.unsupported("compile", "fp32") is None
    runner = runtime.build_runner(model, backend="compile", precision="fp32", threads=1, seq_len=16,
                                  work_dir=tmp_path / "c")
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for batch, seq in [(2, 16), (2, 5), (3, 9), (2, 23)]:  # no recompile after the build's warm-up
        ids = _ids(batch, seq, seed=seq)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        assert (runner.logits(ids) - want).abs().max() < 1e-4
    assert counters["stats"]["unique_graphs"] == graphs
    assert runner.build_s > runner.load_s > 0
    again = runtime.load_runner(runner.artifact_dir)
    assert (again.logits(_ids(2, 7)) - runner.logits(_ids(2, 7))).abs().max() < 1e-5


def test_a_bitnet_model_packs_exactly_with_its_own_layers_and_thresholds(tmp_path, ids):
    """A phase-4 model (plain Linears holding codes x scale, ``config.bitnet`` naming its ternary
    layers and thresholds) packs to the QAT model's outputs: its layers and thresholds are
    reused, not re-derived by absmean (which rescales already-ternary weights)."""
    from phases.bitnet.train import export_hf

    class _Tok:
        def save_pretrained(self, path):
            return None

    qat = tiny_cognate(seed=3)
    names = replace_linears(qat, keep=("lm_head", "model.act.halt"), thresholds=None)
    for n in names:
        qat.get_submodule(n).threshold = 0.5
    qat.eval()
    export_hf(qat, _Tok(), tmp_path / "bitnet", {"layers": names, "thresholds": {n: 0.5 for n in names}})
    from actors.io import load_hf

    plain = load_hf(tmp_path / "bitnet")
    runner = runtime.build_runner(plain, backend="eager", precision="ternary", threads=1,
                                  work_dir=tmp_path / "packed", seq_len=24)
    with torch.no_grad():
        want = qat(input_ids=ids).logits
    assert (runner.logits(ids) - want).abs().max() <= 1e-5
