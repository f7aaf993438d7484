"""Hardware adaptation: pick the device, weight dtype and CPU thread count by measuring them here.

- device: ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"`` (there is nothing to measure: the
  accelerator, when present, is the target); its name is recorded.
- dtype: the candidates are float32 and bfloat16 on CPU; float32, bfloat16 (when
  ``torch.cuda.is_bf16_supported()``) and float16 on CUDA. Each runs on a deep copy; forward latency p50 is
  timed with all candidates interleaved (``graph.paired_latency_ms``, CUDA synchronised), and top-1
  agreement of the logits with float32 is measured. The fastest candidate with agreement >=
  ``min_agreement`` wins (float32 always qualifies).
- threads (CPU only): 1, 2, 4, ... up to ``max_threads`` (default: the CPUs this process may run on), the
  float32 forward profiled with ``phases.compression.profile.profile_model`` at each count (threads are
  process-global, so the counts run one after another, not interleaved); the fastest p50 wins.
  ``torch.get_num_threads()`` is restored afterwards.

Everything measured, the environment (torch version, CPU count, device name) and the reasons are returned as
one JSON-ready record; :func:`apply_target` applies it to a model.
"""

from __future__ import annotations

import copy
import os
import platform

import torch
from torch import nn

from phases.compression.profile import profile_model

from .graph import logits_parity, p50, paired_latency_ms

__all__ = ["apply_target", "choose_target", "thread_counts"]


def thread_counts(max_threads: int) -> list[int]:
    """1, 2, 4, ... below ``max_threads``, then ``max_threads`` itself.

    Raises:
        ValueError: max_threads < 1.
    """
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    counts, n = [], 1
    while n < max_threads:
        counts.append(n)
        n *= 2
    return counts + [max_threads]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@torch.no_grad()
def _measure_dtypes(model, input_ids, device, repeats, min_agreement) -> tuple[dict, str, str]:
    names = ["float32", "bfloat16"]
    skipped = {}
    if device == "cuda":
        if not torch.cuda.is_bf16_supported():
            names.remove("bfloat16")
            skipped["bfloat16"] = {"ok": False, "reason": "torch.cuda.is_bf16_supported() is False"}
        names.append("float16")
    x = input_ids.to(device)
    models, table = {}, {}
    for name in names:
        try:
            m = copy.deepcopy(model).to(device=device, dtype=getattr(torch, name)).eval()
            logits = m(input_ids=x).logits
            models[name], table[name] = m, {"ok": True, "_logits": logits}
        except Exception as exc:  # noqa: BLE001 - a dtype this device cannot run is a result, not a crash
            table[name] = {"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    reference = table["float32"].pop("_logits")
    table["float32"] |= {"max_abs_diff": 0.0, "top1_agreement": 1.0}
    for name in models:
        if name != "float32":
            table[name] |= logits_parity(reference, table[name].pop("_logits"))
    times = paired_latency_ms({n: (lambda m=m: m(input_ids=x)) for n, m in models.items()}, repeats=repeats,
                              device=device)
    for name in models:
        table[name]["latency_ms_p50"] = p50(times[name])
    del models
    good = [n for n in table if table[n]["ok"] and table[n]["top1_agreement"] >= min_agreement]
    chosen = min(good, key=lambda n: table[n]["latency_ms_p50"])
    rejected = [f"{n} (top-1 agreement {table[n]['top1_agreement']:.4f})" for n in table
                if table[n]["ok"] and n not in good]
    reason = f"{chosen}: fastest p50 {table[chosen]['latency_ms_p50']:.3f} ms among dtypes with top-1 agreement " \
             f">= {min_agreement}" + (f"; rejected {', '.join(rejected)}" if rejected else "")
    return table | skipped, chosen, reason


def _measure_threads(model, input_ids, max_threads, repeats) -> tuple[dict, int, str]:
    before = torch.get_num_threads()
    table = {}
    try:
        for n in thread_counts(max_threads):
            torch.set_num_threads(n)
            prof = profile_model(model, input_ids, warmup=2, repeats=repeats)
            table[str(n)] = {"latency_ms_p50": prof.latency_ms_p50, "latency_ms_p95": prof.latency_ms_p95,
                        "tokens_per_s": prof.tokens_per_s}
    finally:
        torch.set_num_threads(before)
    chosen = min(table, key=lambda n: table[n]["latency_ms_p50"])  # keys are str: the record goes through JSON
    return table, int(chosen), f"{chosen} thread(s): fastest float32 p50 ({table[chosen]['latency_ms_p50']:.3f} ms)"


def choose_target(model: nn.Module, input_ids: torch.Tensor, *, repeats: int = 10, max_threads: int | None = None,
                  min_agreement: float = 0.99) -> dict:
    """Measure dtypes (and CPU thread counts) on this machine and choose the deployment target.

    ``model`` is not modified (copies are cast; the thread sweep runs it in eval mode on the CPU).

    Args:
        model: causal LM on the CPU, float32.
        input_ids: (B, T) the benchmark input.
        repeats: timed forwards per candidate.
        max_threads: the largest thread count tried (default: CPUs in this process's affinity).
        min_agreement: top-1 agreement with float32 a lower dtype must keep.
    Returns:
        ``{"device", "device_name", "cuda_device_name", "torch_version", "cpu_count", "input_shape",
        "dtypes": {name: {"ok", "latency_ms_p50", "max_abs_diff", "top1_agreement"} | {"ok": False,
        "reason"}}, "dtype", "dtype_reason", "threads": {n: {"latency_ms_p50", ...}}, "num_threads",
        "threads_reason", "min_agreement"}``.
    Raises:
        ValueError: max_threads < 1.
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    max_threads = _available_cpus() if max_threads is None else max_threads
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    record = {"device": device, "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
              "cuda_device_name": torch.cuda.get_device_name(0) if cuda else None,
              "torch_version": str(torch.__version__), "cpu_count": _available_cpus(),
              "input_shape": list(input_ids.shape), "min_agreement": min_agreement, "repeats": repeats}
    was_training = model.training
    model.eval()
    try:
        record["dtypes"], record["dtype"], record["dtype_reason"] = _measure_dtypes(
            model, input_ids, device, repeats, min_agreement)
        if cuda:
            record["threads"], record["num_threads"] = {}, torch.get_num_threads()
            record["threads_reason"] = "not measured: the forward runs on the GPU; CPU threads left as they are"
        else:
            record["threads"], record["num_threads"], record["threads_reason"] = _measure_threads(
                model, input_ids, max_threads, repeats)
    finally:
        model.train(was_training)
    return record


def apply_target(model: nn.Module, target: dict) -> nn.Module:
    """Move and cast ``model`` to ``target["device"]`` / ``target["dtype"]`` (in place) and, on the CPU, set
    torch's thread count to ``target["num_threads"]`` (process-global). Returns the model.

    Raises:
        ValueError: an unknown dtype name.
    """
    dtype = getattr(torch, str(target["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"target dtype must be a torch dtype name (float32, bfloat16, float16), got "
                         f"{target['dtype']!r}")
    model.to(device=target["device"], dtype=dtype)
    if target["device"] == "cpu" and target.get("num_threads"):
        torch.set_num_threads(int(target["num_threads"]))
    return model
