"""Phase 8's deployment exports: a tiny Cognate model (ACT and, in one case, the Titans memory)
to ONNX, parity with onnxruntime, an int8 ONNX that is smaller on disk, and honest statuses for
TensorRT and the mobile targets."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from coordinator.errors import ConfigError, PhaseError
from phases.compression import codecs, export, package
from tests.phases.tiny_cognate import tiny_cognate

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _ids(batch, seq, seed=0):
    return torch.randint(0, 258, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def decompressed(tmp_path_factory):
    """The model a deployment gets: compressed (int8 matrices), saved, loaded back."""
    model = tiny_cognate(seed=3)
    with torch.no_grad():  # halting that differs per token, so ACT's weights matter
        model.model.act.halt.weight.normal_(0, 0.5)
    stored = {k: codecs.encode(v, "int8" if v.dim() == 2 else "fp32") for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("pkg") / "compressed"
    package.save_compressed(out, stored, hf_config=model.config.to_dict())
    return package.load_model(out)


@pytest.fixture(scope="module")
def fp32_onnx(decompressed, tmp_path_factory):
    return export.export_onnx(decompressed, tmp_path_factory.mktemp("onnx") / "model.onnx", seq_len=16)


def test_onnx_export_matches_torch_at_any_batch_and_length(decompressed, fp32_onnx):
    onnx.checker.check_model(str(fp32_onnx))
    props = _props(fp32_onnx)
    assert props["agentforge.dynamic_seq"] == "true" and props["agentforge.exporter"] == "torchscript"
    graph = onnx.load(str(fp32_onnx)).graph
    assert [i.name for i in graph.input] == ["input_ids"] and [o.name for o in graph.output] == ["logits"]
    for batch, seq in [(2, 16), (1, 5), (3, 40)]:
        parity = export.onnx_parity(decompressed, fp32_onnx, _ids(batch, seq, seed=seq))
        assert parity["max_abs_diff"] < 1e-3 and parity["max_rel_diff"] < 1e-4, (batch, seq, parity)
        assert parity["argmax_agreement"] == 1.0
    assert not decompressed.training


def _weight_bytes(path) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def test_int8_onnx_is_smaller_on_disk_and_still_runs(decompressed, fp32_onnx, tmp_path):
    q = export.quantize_onnx_int8(fp32_onnx, tmp_path / "model.int8.onnx")
    fp32_bytes, int8_bytes = fp32_onnx.stat().st_size, q.stat().st_size
    assert int8_bytes < fp32_bytes, (fp32_bytes, int8_bytes)
    # every weight matrix is int8 (the ACT block's reuse included); on a model this tiny the
    # graph itself (node names, shape arithmetic) is ~100 kB of both files
    assert _weight_bytes(q) < 0.3 * _weight_bytes(fp32_onnx)
    parity = export.onnx_parity(decompressed, q, _ids(2, 16))
    assert parity["max_rel_diff"] < 0.1 and parity["argmax_agreement"] > 0.5, parity


def test_memory_model_exports_with_a_fixed_length_and_dynamic_batch(tmp_path):
    model = tiny_cognate(seed=4, memory_enabled=True)
    with torch.no_grad():
        model.model.memory.o_proj.weight.normal_(0, 0.1)  # the untrained memory adds nothing
    path = export.export_onnx(model, tmp_path / "memory.onnx", seq_len=20)
    assert _props(path)["agentforge.dynamic_seq"] == "false"
    for batch in (1, 2, 3):
        parity = export.onnx_parity(model, path, _ids(batch, 20, seed=batch))
        assert parity["max_abs_diff"] < 1e-3 and parity["argmax_agreement"] == 1.0, parity
    with pytest.raises(PhaseError, match="fixed size 20 on axis 1"):  # another length is outside the graph
        export.onnx_parity(model, path, _ids(1, 12))


@pytest.mark.slow
def test_the_dynamo_exporter_also_gives_a_matching_graph(tmp_path):
    """Default-run sibling: test_onnx_export_matches_torch_at_any_batch_and_length (the
    TorchScript exporter, which export_onnx tries first)."""
    model = tiny_cognate(seed=5)
    path = export.export_onnx(model, tmp_path / "dynamo.onnx", seq_len=8, opset=18, exporter="dynamo")
    assert _props(path)["agentforge.exporter"] == "dynamo"
    for batch, seq in [(2, 8), (1, 13)]:
        assert export.onnx_parity(model, path, _ids(batch, seq))["max_abs_diff"] < 1e-3


def test_an_unexportable_operator_is_a_phase_error_naming_it(tmp_path):
    class Zeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, input_ids):
            x = self.emb(input_ids)
            return torch.special.zeta(x.abs() + 2, x.abs() + 1)

    with pytest.raises(PhaseError, match="aten::special_zeta"):
        export.export_onnx(Zeta(), tmp_path / "zeta.onnx", seq_len=4, exporter="torchscript")
    with pytest.raises(ConfigError, match="choose from auto, torchscript, dynamo"):
        export.export_onnx(Zeta(), tmp_path / "zeta.onnx", seq_len=4, exporter="tvm")


def test_tensorrt_status_is_honest(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    assert export.tensorrt_status() == "skipped: tensorrt not installed"
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert export.tensorrt_status().startswith("not built: tensorrt is installed")


def test_mobile_targets_are_reported_unsupported_never_faked():
    assert export.MOBILE_TARGETS == ("tflite", "coreml", "executorch")
    for target in export.MOBILE_TARGETS:
        assert export.mobile_status(target) == f"not supported: {target} export is not built"
    with pytest.raises(ConfigError, match="known: tflite, coreml, executorch"):
        export.mobile_status("android")
