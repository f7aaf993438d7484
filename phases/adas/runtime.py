"""Deployment backends of Phase 7 (ADAS): a causal LM built as a deployable artifact for one
backend and precision, written to disk, and reloaded from that artifact to run, so every
measurement (``measure.py``) is of what would ship.

Backends x precisions (:func:`unsupported` says why a combination cannot run here):

- ``eager``: the PyTorch model. fp32/fp16/bf16: a dtype cast, saved with ``save_pretrained`` in
  that dtype. int8: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (int8
  weights, activations quantised per call; CPU only). Its quantized state is not an HF model dir,
  so the artifact is the fp32 HF dir plus ``runtime.json`` saying "int8 dynamic at load":
  ``bytes_on_disk`` counts what is written (fp32 weights), not the int8 weights in memory.
  ternary: BitNet b1.58 (``phases.bitnet``): ``replace_linears`` (the LM head kept), then
  ``save_packed`` (base-3 packing, 1.6 bits per weight) and ``load_packed`` with the ``"int8"``
  kernel where fbgemm has it, else ``"decode"``. A model not trained for ternary weights is
  ternarised here, which is lossy: the accuracy measurement shows the cost.
- ``compile``: ``torch.compile(dynamic=True)`` of the eager model (fp32/fp16/bf16). The first
  calls compile; the build makes two, shapes (2, L) and (3, L - 1) with L = max(seq_len, 3),
  so ``build_s`` includes compilation. Cognate's ACT early exit is a data-dependent ``bool``,
  so dynamo breaks the graph there, and the frames resumed after a break compile with static
  sizes first and turn dynamic on their first other size: the second warm-up call does that.
  After it a new batch or length reuses the graphs, except batch 1 and length 1, which dynamo
  specialises (0/1 specialisation): each compiles once more on first use (measured: ~7 s on
  one thread for the tiny test model), so recompiles are bounded, not one per length; the
  measurements' warm-up calls absorb them.
- ``onnxruntime``: ``phases.compression.export.export_onnx`` (fp32: ``model.onnx``) and
  ``quantize_onnx_int8`` (int8: ``model.int8.onnx``, the fp32 intermediate not kept), run by an
  ``InferenceSession`` with ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``
  (CPU provider; the CUDA provider for ``device="cuda"`` where onnxruntime has it). With the
  Titans memory on the graph's sequence length is fixed (``Runner.fixed_seq``): shorter inputs
  are right-padded with the pad id and the logits cut back to T. The model is causal (attention
  masks later tokens; a memory chunk reads only the chunks before it), so the first T positions
  do not depend on the padding; a test checks this against the torch model, memory included.
- ``tensorrt``: never built here; the reason is ``tensorrt_status()``'s.

Every artifact dir holds ``runtime.json`` (backend, precision, threads, device, seq_len, files,
...), written with the model files into a staging dir published at ``work_dir`` at the end;
:func:`load_runner` rebuilds a :class:`Runner` from it (the deployer's reload check). onnx,
onnxruntime and tensorrt are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.errors import ArtifactError, ConfigError, PhaseError
from phases.compression.profile import bytes_on_disk

__all__ = ["BACKENDS", "PRECISIONS", "RUNTIME_FILE", "Runner", "build_runner", "load_runner", "unsupported"]

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "ternary")
DEVICES = ("cpu", "cuda")
RUNTIME_FILE = "runtime.json"
_FORMAT = 1
_PHASE = "adas"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PACKING = "base3"  # 1.6 bits per ternary weight (phases.bitnet.packing)
_ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


def _check_name(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        msg = f"unknown {field} {value!r}; choose from {', '.join(allowed)}"
        raise ConfigError(msg, [(field, msg)])


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _dynamic_int8_reason() -> str | None:
    try:
        available = hasattr(importlib.import_module("torch.ao.quantization"), "quantize_dynamic")
    except ImportError:
        available = False
    if not available:
        return f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic"
    if not set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "qnnpack", "onednn"}:
        return "this torch build has no quantized CPU engine for dynamic int8 linears"
    return None


def unsupported(backend: str, precision: str, device: str = "cpu") -> str | None:
    """Why ``backend`` x ``precision`` on ``device`` cannot be built and run on this machine.

    Returns:
        None when it can; else a one-line reason.
    Raises:
        ConfigError (a ValueError): an unknown backend, precision or device (lists the valid ones).
    """
    _check_name("backend", backend, BACKENDS)
    _check_name("precision", precision, PRECISIONS)
    _check_name("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "tensorrt":
        from phases.compression.export import tensorrt_status

        return tensorrt_status()
    if backend == "eager":
        if precision == "int8":
            if device != "cpu":
                return "torch dynamic int8 quantization runs on CPU only"
            return _dynamic_int8_reason()
        return None
    if backend == "compile":
        if precision not in _DTYPES:
            return f"torch.compile of {precision} layers (dynamic-quantized or packed ternary) is not built here"
        if device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return "torch.compile (inductor) needs a C++ compiler on CPU; none is on PATH"
        return None
    # onnxruntime
    if precision not in _ONNX_FILES:
        return f"onnxruntime runs fp32 and int8 (dynamic quantization) here, not {precision}"
    missing = [m for m in ("onnx", "onnxruntime") if not _has(m)]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider in this install"
        if precision == "int8":
            return "the dynamic-int8 ONNX graph runs on the CPU execution provider only here"
    return None


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


class Runner:
    """A deployed artifact, loaded and ready to run: see the module docstring.

    Attributes:
        backend, precision, device: what was built; threads: torch / ORT intra-op threads per call.
        artifact_dir: the dir holding ``files`` (``runtime.json`` among them).
        bytes_on_disk: the sum of the sizes of ``files``.
        build_s: wall seconds to make the artifact (cast / quantize / export / save) plus
            ``load_s``; load_s: wall seconds of the reload, a compile backend's first
            (compiling) call included.
        fixed_seq: the sequence length an ONNX graph is fixed at (memory on), else None.
        pad_id: the id shorter inputs are right-padded with for a fixed-length graph.
    """

    def __init__(self, *, backend: str, precision: str, device: str, threads: int, artifact_dir: Path,
                 files: list[str], artifact_s: float, load_s: float, fixed_seq: int | None, pad_id: int,
                 forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module | None = None):
        self.backend, self.precision, self.device, self.threads = backend, precision, device, threads
        self.artifact_dir, self.files = Path(artifact_dir), list(files)
        self.bytes_on_disk = sum(bytes_on_disk(self.artifact_dir / f) for f in self.files)
        self.load_s = load_s
        self.build_s = artifact_s + load_s
        self.fixed_seq, self.pad_id = fixed_seq, pad_id
        self.module = module  # the torch module run (None for onnxruntime)
        self._forward = forward

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``ids`` (B, T) long: (B, T, V) float32 on CPU, no grad, ``threads`` torch threads.

        Raises:
            ValueError: ``ids`` is not 2-D, or T exceeds a fixed-length graph's ``fixed_seq``.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, seq), got shape {tuple(ids.shape)}")
        ids = ids.long().cpu()
        seq = ids.shape[1]
        if self.fixed_seq is not None:
            if seq > self.fixed_seq:
                raise ValueError(f"input length {seq} exceeds the graph's fixed sequence length {self.fixed_seq} "
                                 f"({self.artifact_dir})")
            if seq < self.fixed_seq:  # causal: the first T positions ignore the right padding
                ids = torch.cat([ids, ids.new_full((ids.shape[0], self.fixed_seq - seq), self.pad_id)], 1)
        with torch.no_grad(), _torch_threads(self.threads):
            out = self._forward(ids)
        return out[:, :seq].float().cpu()

    def __repr__(self) -> str:
        return (f"Runner(backend={self.backend!r}, precision={self.precision!r}, device={self.device!r}, "
                f"threads={self.threads}, bytes_on_disk={self.bytes_on_disk}, fixed_seq={self.fixed_seq}, "
                f"artifact_dir={str(self.artifact_dir)!r})")


# --- building the artifact ------------------------------------------------------------------

def _pad_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def _fp_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    return copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _write_hf(model: nn.Module, out: Path, precision: str) -> dict[str, Any]:
    _quiet_hf()
    _fp_copy(model, _DTYPES.get(precision, torch.float32)).save_pretrained(str(out))
    return {"note": "int8 dynamic at load: the fp32 HF dir is stored, torch quantize_dynamic runs at load"} \
        if precision == "int8" else {}


def _write_ternary(model: nn.Module, out: Path, precision: str) -> dict[str, Any]:
    from phases.bitnet.packed import PackedBitLinear, int8_kernel_available, save_packed
    from phases.bitnet.quant import BitLinear, replace_linears

    work = _fp_copy(model)
    already = any(isinstance(m, (BitLinear, PackedBitLinear)) for m in work.modules())
    info = getattr(work.config, "bitnet", None)
    if not already and info and info.get("layers"):
        # phase 4's ternary layers with their thresholds (as phases.bitnet.train.load_trainable does):
        # the stored codes * scale quantize back to the same codes and scale, so packing is exact
        layers = set(info["layers"])
        linears = [n for n, m in work.named_modules() if type(m) is nn.Linear]
        thresholds = {n: (info.get("thresholds") or {}).get(n) or 0.5 for n in layers if n in linears}
        replace_linears(work, keep=[n for n in linears if n not in layers], thresholds=thresholds)
    elif not already:  # lossy for a model not trained ternary (module docstring)
        replace_linears(work)
    save_packed(work, out, _PACKING)
    return {"packing": _PACKING, "kernel": "int8" if int8_kernel_available() else "decode",
            "ternarised_here": not already}


def _write_onnx(model: nn.Module, out: Path, precision: str, seq_len: int) -> dict[str, Any]:
    from phases.compression.export import export_onnx, quantize_onnx_int8

    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(_fp_copy(model), out / _ONNX_FILES["fp32"], seq_len=seq_len)
    if precision == "int8":
        quantize_onnx_int8(fp32, out / _ONNX_FILES["int8"])
        fp32.unlink()  # the intermediate is not part of the int8 artifact
    return {"onnx": _ONNX_FILES[precision]}


def build_runner(model: nn.Module, *, backend: str, precision: str, threads: int, work_dir: str | Path,
                 seq_len: int, device: str = "cpu") -> Runner:
    """Build ``model`` for ``backend`` x ``precision``, write the artifact to ``work_dir``, reload it.

    Args:
        model: a causal LM (Cognate family, HF ``PreTrainedModel``); not modified (copies are built).
        threads: torch threads (and ORT intra-op threads) for the build and for every call.
        work_dir: a fresh (absent or empty) dir; it becomes the artifact dir.
        seq_len: the ONNX export's example length (the fixed length with the memory on); the
            compile backend's warm-up call length.
        device: "cpu" or "cuda".
    Returns:
        The :class:`Runner` of the reloaded artifact.
    Raises:
        ConfigError: unknown names, threads < 1, seq_len < 1, or a non-empty ``work_dir``.
        PhaseError: this machine cannot build the combination (the reason from :func:`unsupported`).
    """
    reason = unsupported(backend, precision, device)
    if reason is not None:
        raise PhaseError(_PHASE, f"cannot build {backend}/{precision} on {device}: {reason}")
    for field, value in (("threads", threads), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            msg = f"{field} must be an int >= 1, got {value!r}"
            raise ConfigError(msg, [(field, msg)])
    out = Path(work_dir)
    if out.exists() and any(out.iterdir()):
        msg = f"work_dir {out} is not empty; give a fresh dir"
        raise ConfigError(msg, [("work_dir", msg)])
    from serialization.checkpoint import atomic_write_json, publish_dir, staging_dir

    tmp = staging_dir(out)
    start = time.perf_counter()
    with _torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporters' tracer notes, torch.ao deprecation
        if backend == "onnxruntime":
            extra = _write_onnx(model, tmp, precision, seq_len)
        elif precision == "ternary":
            extra = _write_ternary(model, tmp, precision)
        else:
            extra = _write_hf(model, tmp, precision)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    artifact_s = time.perf_counter() - start
    atomic_write_json(tmp / RUNTIME_FILE, {
        "format": _FORMAT, "backend": backend, "precision": precision, "threads": threads, "device": device,
        "seq_len": seq_len, "pad_id": _pad_id(model), "files": files + [RUNTIME_FILE], **extra})
    publish_dir(tmp, out)  # no timing inside: the artifact's bytes are a function of the model and recipe
    runner = load_runner(out)
    runner.build_s += artifact_s
    return runner


# --- reloading ------------------------------------------------------------------------------

def _load_torch(meta: dict[str, Any], root: Path) -> nn.Module:
    precision, device = meta["precision"], meta["device"]
    if precision == "ternary":
        from phases.bitnet.packed import load_packed

        kernel = meta.get("kernel", "decode") if device == "cpu" else "decode"  # int8 GEMM: CPU only
        return load_packed(root, kernel=kernel).to(device)
    from transformers import AutoModelForCausalLM

    importlib.import_module("phases.cognate.modeling")  # registers the Cognate family with the Auto classes
    _quiet_hf()
    model = AutoModelForCausalLM.from_pretrained(str(root), dtype=_DTYPES.get(precision, torch.float32)).eval()
    if precision == "int8":
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model.to(device)


def _torch_forward(model: nn.Module, device: str, compiled: bool,
                   seq_len: int) -> Callable[[torch.Tensor], torch.Tensor]:
    call = torch.compile(model, dynamic=True) if compiled else model

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return _logits_of(call(input_ids=ids.to(device)))

    if compiled:  # the compiling calls, timed into load_s (module docstring: recompiles)
        length = max(seq_len, 3)
        with torch.no_grad():
            for shape in ((2, length), (3, length - 1)):
                forward(torch.zeros(shape, dtype=torch.long))
    return forward


def _ort_forward(meta: dict[str, Any], root: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(meta["threads"])
    opts.inter_op_num_threads = 1
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if meta["device"] == "cuda"
                 else ["CPUExecutionProvider"])
    session = ort.InferenceSession(str(root / meta["onnx"]), sess_options=opts, providers=providers)
    seq_axis = session.get_inputs()[0].shape[1]  # "seq" (dynamic) or an int (fixed)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])

    return forward, seq_axis if isinstance(seq_axis, int) else None


def load_runner(artifact_dir: str | Path) -> Runner:
    """Rebuild the :class:`Runner` of an artifact dir written by :func:`build_runner`.

    Raises:
        ArtifactError: no or a malformed ``runtime.json``, or a listed file is missing.
        PhaseError: this machine cannot run the recorded combination.
    """
    from serialization.checkpoint import read_json

    root = Path(artifact_dir)
    meta_path = root / RUNTIME_FILE
    if not meta_path.is_file():
        raise ArtifactError(str(meta_path), "not a runtime artifact dir (no runtime.json)")
    meta = read_json(meta_path)
    try:
        backend, precision, device, files = meta["backend"], meta["precision"], meta["device"], meta["files"]
        threads, seq_len = int(meta["threads"]), int(meta["seq_len"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(str(meta_path), f"malformed: {err!r}") from None
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ArtifactError(str(root), f"files listed in runtime.json are missing: {', '.join(missing)}")
    reason = unsupported(backend, precision, device)
    if reason is not None:
        raise PhaseError(_PHASE, f"{root}: cannot run {backend}/{precision} on {device}: {reason}")
    start = time.perf_counter()
    module, fixed = None, None
    with _torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation, dynamo notes
        if backend == "onnxruntime":
            forward, fixed = _ort_forward(meta, root)
        else:
            module = _load_torch(meta, root)
            forward = _torch_forward(module, device, backend == "compile", seq_len)
    load_s = time.perf_counter() - start
    return Runner(backend=backend, precision=precision, device=device, threads=threads, artifact_dir=root,
                  files=files, artifact_s=0.0, load_s=load_s, fixed_seq=fixed,
                  pad_id=int(meta.get("pad_id", 0)), forward=forward, module=module)
