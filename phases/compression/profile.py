"""Phase 8's performance profiler: latency, throughput and memory of a model's forward pass,
and bytes on disk, measured on this machine in this run so the numbers compare only with each
other (:func:`compare` turns them into ratios against a reference model).

What each number is:

- latency: wall time (``time.perf_counter_ns``) of one full forward pass of ``input_ids`` under
  ``torch.no_grad`` in eval mode, after ``warmup`` untimed passes; p50 and p95 over ``repeats``
  timed passes (linear interpolation between order statistics, numpy's default percentile);
- throughput: ``batch x seq_len / mean latency`` tokens per second;
- peak memory: the highest number of bytes that PyTorch's CPU allocator held during one extra
  forward pass beyond what it held when that pass began, taken from the allocation events that
  ``torch.profiler.profile(profile_memory=True)`` records (each event carries its signed size;
  the peak is the maximum running sum in time order, the same events the PyTorch memory profiler
  builds its timeline from). It counts activations, temporaries and the outputs; it does not
  count weights and inputs (they exist before the pass), nor memory that does not go through
  the tensor allocator (Python objects, oneDNN/MKL scratch buffers, allocator fragmentation).
  ``resource.getrusage`` max-RSS was the alternative; it needs a fresh process per model and
  also counts the interpreter and torch's own libraries, which swamp a small model.
- parameter bytes: bytes of the model's distinct parameters and buffers (tied tensors once),
  as EvoMerge counts them (:func:`phases.evomerge.fitness.weight_bytes`).

``torch.set_num_threads`` is left as the caller set it; the profile records the value.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from coordinator.errors import ArtifactError
from phases.evomerge.fitness import weight_bytes

__all__ = ["Profile", "bytes_on_disk", "compare", "peak_forward_memory", "profile_model"]


@dataclass(frozen=True)
class Profile:
    """One model's measured performance on one input shape (see the module docstring)."""

    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_mean: float
    tokens_per_s: float
    peak_memory_bytes: int
    parameter_bytes: int
    batch: int
    seq_len: int
    repeats: int
    threads: int  # torch.get_num_threads() while measuring

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def _forward(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    model(input_ids=input_ids)


@torch.no_grad()
def peak_forward_memory(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Peak bytes the CPU tensor allocator held during one forward, above its level at the start.

    Raises:
        RuntimeError: the profiler recorded no allocation at all (memory profiling unavailable).
    """
    from torch._C._profiler import _EventType  # the event kinds of the profiler's event tree

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward(model, input_ids)
    events: list[tuple[int, int]] = []
    stack = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:  # pre-order walk: events in the order the tree records them
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # size < 0: a free
        stack.extend(reversed(node.children))
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocation during the forward pass; "
                           "peak memory cannot be measured")
    peak = running = 0
    for _, size in sorted(events, key=lambda e: e[0]):  # stable: same-time events keep tree order
        running += size
        peak = max(peak, running)
    return peak


@torch.no_grad()
def profile_model(model: torch.nn.Module, input_ids: torch.Tensor, *, warmup: int = 2, repeats: int = 10) -> Profile:
    """Time ``repeats`` forward passes of ``input_ids`` (B, T) and measure one pass's peak memory.

    Args:
        model: causal LM called as ``model(input_ids=...)``; put in eval mode while measured.
        input_ids: LongTensor (B, T), on the model's device.
        warmup: untimed passes first (lazy initialisation, caches).
        repeats: timed passes (>= 1).
    Returns:
        The :class:`Profile`.
    Raises:
        ValueError: ``input_ids`` is not 2-D, ``warmup`` < 0 or ``repeats`` < 1.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _forward(model, input_ids)
        times_ns = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            _forward(model, input_ids)
            times_ns.append(time.perf_counter_ns() - start)
        peak = peak_forward_memory(model, input_ids)
    finally:
        model.train(was_training)
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    batch, seq_len = input_ids.shape
    mean_ms = float(ms.mean())
    return Profile(latency_ms_p50=float(np.percentile(ms, 50)), latency_ms_p95=float(np.percentile(ms, 95)),
                   latency_ms_mean=mean_ms, tokens_per_s=batch * seq_len / (mean_ms / 1e3),
                   peak_memory_bytes=peak, parameter_bytes=weight_bytes(model), batch=batch, seq_len=seq_len,
                   repeats=repeats, threads=torch.get_num_threads())


def bytes_on_disk(path: str | os.PathLike) -> int:
    """Size of a file, or the sum of the sizes of every regular file under a directory (recursive;
    symbolic links are not followed or counted).

    Raises:
        ArtifactError: the path does not exist.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise ArtifactError(str(path), "cannot measure bytes on disk: no such file or directory")
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            f = Path(root) / name
            if not f.is_symlink() and f.is_file():
                total += f.stat().st_size
    return total


def compare(profiles: dict[str, Profile], reference: str) -> dict[str, dict[str, float | None]]:
    """Each profile's ratios to the reference's (the reference's own are 1.0).

    Returns:
        ``name -> {"latency_ratio": p50 / reference p50 (< 1 is faster),
        "throughput_ratio": tokens/s / reference tokens/s (> 1 is faster),
        "memory_ratio": peak memory / reference peak memory (None when the reference's is 0),
        "parameter_bytes_ratio": parameter bytes / reference parameter bytes}``.
    Raises:
        KeyError: ``reference`` is not one of the profiles (the message lists them).
    """
    if reference not in profiles:
        raise KeyError(f"reference {reference!r} is not among the profiles: {', '.join(profiles) or '(none)'}")
    ref = profiles[reference]
    return {name: {"latency_ratio": p.latency_ms_p50 / ref.latency_ms_p50,
                   "throughput_ratio": p.tokens_per_s / ref.tokens_per_s,
                   "memory_ratio": p.peak_memory_bytes / ref.peak_memory_bytes if ref.peak_memory_bytes else None,
                   "parameter_bytes_ratio": p.parameter_bytes / ref.parameter_bytes if ref.parameter_bytes else None}
            for name, p in profiles.items()}
