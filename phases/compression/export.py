"""Deployment exports of the final (decompressed) causal LM: ONNX (fp32), ONNX with int8
weights (onnxruntime dynamic quantisation), and honest statuses for TensorRT and mobile targets.

ONNX of Cognate (``phases.cognate.modeling``). Two parts are data dependent in PyTorch:

- ACT halting (``act.py``) stops pondering once every token reached the threshold, a Python
  ``bool`` of a tensor that a trace would freeze at the example's step count. Steps after a
  token halts add exact zeros (``ACTPonder`` documents that early exit is bit-exact), so the
  export runs every step up to the eval cap (``act_max_steps_infer``, a config constant) by
  passing ACT's ``halted`` predicate "never"; the graph is then exact for every input, at the
  cost of always running the cap (2 steps by default) where PyTorch may stop after one.
- The Titans memory (``memory.py``, when ``memory_enabled``) loops over chunks of the sequence
  in Python and picks its dual or explicit form by the sequence length, so its graph holds for
  the traced length only: with the memory on, the exported sequence length is fixed at
  ``seq_len`` (the batch stays dynamic). Without it both batch and sequence are dynamic.

The TorchScript exporter (``dynamo=False``) is tried first (fast, and it traces Cognate); when
it fails, the ``torch.export`` exporter (onnxscript) is tried; when both fail a PhaseError
names the operators the exporters reported. The ONNX file records the choice in its metadata
(``agentforge.dynamic_seq``, ``agentforge.seq_len``, ``agentforge.exporter``). Weights the
exporter shares through Identity nodes (the pondered block's, unrolled per step) are folded
back to their initializer so that int8 quantisation covers every use.

onnx, onnxruntime and tensorrt are optional dependencies, imported inside the functions that
need them (CONVENTIONS rule 4).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from coordinator.errors import ConfigError, PhaseError

__all__ = ["MOBILE_TARGETS", "export_onnx", "mobile_status", "onnx_parity", "quantize_onnx_int8",
           "tensorrt_status"]

MOBILE_TARGETS = ("tflite", "coreml", "executorch")
_PHASE = "compression"


class _Logits(torch.nn.Module):
    """``input_ids`` (B, T) int64 -> ``logits`` (B, T, V): the one output deployments need."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out[0]


def _never(cum: torch.Tensor) -> bool:
    return False


@contextlib.contextmanager
def _every_ponder_step(model: torch.nn.Module) -> Iterator[None]:
    """Make every ACT module run all its capped steps (no data-dependent early exit)."""
    from phases.cognate.act import ACTPonder

    patched = [m for m in model.modules() if isinstance(m, ACTPonder)]
    for m in patched:
        m.forward = functools.partial(ACTPonder.forward, m, halted=_never)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _blocked_ops(message: str) -> str:
    ops = sorted(set(re.findall(r"(?:aten|prim|onnx)::[\w.]+", message)))
    return f" (operators named: {', '.join(ops)})" if ops else ""


def _torchscript(wrapper, example, path: Path, opset: int, dynamic_seq: bool) -> None:
    axes = {0: "batch", 1: "seq"} if dynamic_seq else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on constant shapes; the exporter's deprecation note
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=["input_ids"],
                          output_names=["logits"], dynamic_axes={"input_ids": axes, "logits": axes},
                          opset_version=opset, do_constant_folding=True)


def _dynamo(wrapper, example, path: Path, opset: int, dynamic_seq: bool) -> None:
    from torch.export import Dim

    dims = {0: Dim("batch")} | ({1: Dim("seq")} if dynamic_seq else {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"input_ids": dims},
                          opset_version=opset, external_data=False)


_EXPORTERS = {"torchscript": _torchscript, "dynamo": _dynamo}


def _fold_weight_identities(graph) -> int:
    """Point every ``Identity(initializer)`` consumer at the initializer itself and drop the node.

    The TorchScript exporter writes a weight used twice (ACT's pondered block, unrolled per
    step; equal norm weights) once, with Identity nodes for the other uses. onnxruntime's
    quantiser only quantises MatMul weights that are initializers, and the shared fp32
    initializer would stay behind for the Identity; folding lets every use share one int8 copy.
    Returns the number of nodes removed (0 when the graph has subgraphs: left as is).
    """
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return 0
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.output[0] not in outputs and n.input[0] in inits}
    if not alias:
        return 0
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def export_onnx(model: torch.nn.Module, path: str | Path, *, seq_len: int, opset: int = 17,
                exporter: str = "auto") -> Path:
    """Export a causal LM as ONNX: input ``input_ids`` (batch, seq) int64, output ``logits``
    (batch, seq, vocab) float32. Batch is dynamic; seq too unless the model has the Titans
    memory on (then it is fixed at ``seq_len``; see the module docstring).

    Args:
        model: a (decompressed) causal LM; exported in eval mode, its mode restored after.
        seq_len: sequence length of the example input (the fixed length when seq is static).
        opset: ONNX opset.
        exporter: "torchscript", "dynamo", or "auto" (TorchScript, then dynamo on failure).
    Returns:
        ``path``, checked with ``onnx.checker.check_model``.
    Raises:
        ConfigError: an unknown exporter or a bad seq_len.
        PhaseError: every exporter tried failed (the message names the operators reported).
    """
    import onnx

    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}
    if exporter not in order:
        msg = f"unknown exporter {exporter!r}; choose from {', '.join(order)}"
        raise ConfigError(msg, [("exporter", msg)])
    if seq_len < 1:
        msg = f"seq_len must be >= 1, got {seq_len}"
        raise ConfigError(msg, [("seq_len", msg)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    dynamic_seq = not getattr(config, "memory_enabled", False)
    vocab = int(getattr(config, "vocab_size", 2))
    example = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    failures = []
    try:
        with torch.no_grad(), _every_ponder_step(model):
            for name in order[exporter]:
                try:
                    _EXPORTERS[name](_Logits(model), example, path, opset, dynamic_seq)
                    break
                except Exception as exc:  # the exporters raise many types (RuntimeError, OnnxExporterError, ...)
                    failures.append(f"{name} exporter: {type(exc).__name__}: {exc}")
            else:
                text = "; ".join(failures)
                raise PhaseError(_PHASE, f"ONNX export of {type(model).__name__} failed{_blocked_ops(text)}: {text}")
    finally:
        model.train(was_training)
    proto = onnx.load(str(path))
    _fold_weight_identities(proto.graph)
    onnx.helper.set_model_props(proto, {"agentforge.dynamic_seq": str(dynamic_seq).lower(),
                                        "agentforge.seq_len": str(seq_len), "agentforge.exporter": name,
                                        "agentforge.model": type(model).__name__})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def onnx_parity(model: torch.nn.Module, onnx_path: str | Path, input_ids: torch.Tensor) -> dict[str, float]:
    """Compare onnxruntime (CPUExecutionProvider) with the torch model on ``input_ids`` (B, T).

    Returns:
        max_abs_diff: max |onnx - torch| over all logits;
        max_rel_diff: max_abs_diff / max |torch logits| (relative to the logit scale; an
            element-wise ratio explodes near zero logits);
        argmax_agreement: fraction of positions whose top token agrees.
    Raises:
        PhaseError: ``input_ids`` does not fit a fixed axis of the graph, or the shapes differ.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0].shape  # e.g. ["batch", "seq"] or ["batch", 20]
    for axis, (want, got) in enumerate(zip(declared, input_ids.shape)):
        if isinstance(want, int) and want != got:
            raise PhaseError(_PHASE, f"{onnx_path}: the graph's input_ids has a fixed size {want} on axis {axis} "
                                     f"(shape {declared}), got input of shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _Logits(model)(input_ids.long()).float()
    finally:
        model.train(was_training)
    got = torch.from_numpy(session.run(["logits"], {"input_ids": input_ids.long().numpy()})[0]).float()
    if got.shape != ref.shape:
        raise PhaseError(_PHASE, f"{onnx_path}: ONNX logits have shape {tuple(got.shape)}, torch "
                                 f"{tuple(ref.shape)} (a fixed sequence length?)")
    diff = (got - ref).abs()
    return {"max_abs_diff": float(diff.max()),
            "max_rel_diff": float(diff.max() / ref.abs().max().clamp_min(1e-12)),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def quantize_onnx_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic int8 quantisation of an ONNX model's weights (``quantize_dynamic``, QInt8):
    MatMul/Gather weights stored as int8 with scales; activations quantised at run time.

    Returns:
        ``out_path``, checked with ``onnx.checker.check_model``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logging.disable(logging.WARNING)  # the quantizer logs each tensor it skips (with its protobuf) to the root logger
    try:
        quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    onnx.checker.check_model(str(out_path))
    return out_path


def tensorrt_status() -> str:
    """"skipped: tensorrt not installed", or, where the package imports, "not built: ..." (no
    engine is built yet: that needs a GPU this project's CI does not have; never reported as done)."""
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return "skipped: tensorrt not installed"
    return "not built: tensorrt is installed, but building an engine is not implemented yet"


def mobile_status(target: str) -> str:
    """What exporting to a mobile runtime gives: none of them is built, and none is faked.

    Raises:
        ConfigError: ``target`` is not one of MOBILE_TARGETS.
    """
    if target not in MOBILE_TARGETS:
        msg = f"unknown mobile target {target!r}; known: {', '.join(MOBILE_TARGETS)}"
        raise ConfigError(msg, [("target", msg)])
    return f"not supported: {target} export is not built"
