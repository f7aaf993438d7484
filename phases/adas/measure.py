"""Measurements of a deployed candidate (a ``runtime.Runner``, i.e. the artifact reloaded from
disk): call latency, per-token latency of greedy decoding, resident memory growth, next-token
accuracy, and parity with reference logits.

What each number is:

- latencies: wall time (``time.perf_counter_ns``) in milliseconds; the warm-up calls (lazy
  initialisation, compilation, caches) are run but not recorded. Percentiles are numpy's
  linear interpolation between order statistics.
- token latency: greedy decoding WITHOUT a KV cache (no backend here keeps one): each step
  computes the logits of the whole current context and appends the argmax of the last
  position, so step i costs a forward of P + i tokens. This is the decode loop these runners
  offer, not what a cached decoder would cost.
- peak RSS growth: see :func:`peak_rss_growth`.
- accuracy: next-token top-1 over every position of the windows.

The runner sets its own thread count per call; nothing here changes torch's settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["call_latency", "parity", "peak_rss_growth", "percentiles", "token_accuracy", "token_latency"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def percentiles(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """{"p50", "p95", "p99", "mean", "max", "n"} of ``samples_ms`` (numpy percentile, linear).

    Raises:
        ValueError: no samples.
    """
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("percentiles of no samples")
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(a.mean()),
            "max": float(a.max()), "n": int(a.size)}


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")


def call_latency(runner: Any, ids: torch.Tensor, *, warmup: int = 3, repeats: int = 20) -> dict[str, Any]:
    """Wall time of ``runner.logits(ids)`` (ids (B, T)): percentiles over ``repeats`` timed calls
    after ``warmup`` untimed ones, plus "samples_ms" (the timed calls, in order).

    Raises:
        ValueError: warmup < 0 or repeats < 1.
    """
    _check_counts(warmup, repeats)
    for _ in range(warmup):
        runner.logits(ids)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        runner.logits(ids)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return {**percentiles(samples), "samples_ms": samples}


def _greedy(runner: Any, prompt: torch.Tensor, new_tokens: int, samples: list[float] | None) -> torch.Tensor:
    ids = prompt
    for _ in range(new_tokens):
        start = time.perf_counter_ns()
        nxt = runner.logits(ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], 1)
        if samples is not None:
            samples.append((time.perf_counter_ns() - start) / 1e6)
    return ids


def token_latency(runner: Any, prompt_ids: torch.Tensor, new_tokens: int, *, warmup: int = 1,
                  repeats: int = 3) -> dict[str, Any]:
    """Per-step wall time of greedy decoding without a KV cache (module docstring) from
    ``prompt_ids`` (B, P) for ``new_tokens`` steps, ``warmup`` untimed repetitions, then
    ``repeats`` timed ones. A step is one forward of the whole context, its argmax and the append.

    Returns:
        percentiles over the repeats x new_tokens step times, "samples_ms" (in order),
        "tokens" (B x new_tokens, the tokens one repetition makes), "tokens_per_s" (B / mean step).
    Raises:
        ValueError: bad counts, ``prompt_ids`` not (B, P >= 1), or P + new_tokens exceeds the
            runner's ``fixed_seq``.
    """
    _check_counts(warmup, repeats)
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (batch, prompt_len >= 1), got shape {tuple(prompt_ids.shape)}")
    fixed = getattr(runner, "fixed_seq", None)
    if fixed is not None and prompt_ids.shape[1] + new_tokens > fixed:
        raise ValueError(f"prompt length {prompt_ids.shape[1]} + new_tokens {new_tokens} exceeds the runner's "
                         f"fixed sequence length {fixed}")
    for _ in range(warmup):
        _greedy(runner, prompt_ids, new_tokens, None)
    samples: list[float] = []
    for _ in range(repeats):
        _greedy(runner, prompt_ids, new_tokens, samples)
    stats = percentiles(samples)
    batch = int(prompt_ids.shape[0])
    return {**stats, "samples_ms": samples, "tokens": batch * new_tokens,
            "tokens_per_s": batch / (stats["mean"] / 1e3)}


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmRSS:   1234 kB"
    raise KeyError(field)


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        pass


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn()`` and measure how far this process's resident set rose above its level at the start.

    Linux only: ``gc.collect()`` and glibc ``malloc_trim(0)`` first (free heap pages go back to
    the OS, so that reused free memory does not hide growth), then the kernel's peak RSS
    (VmHWM) is reset by writing "5" to ``/proc/self/clear_refs``, the baseline is VmRSS, and
    after ``fn`` the peak is VmHWM. It counts every page this process made resident while
    ``fn`` ran and had resident at the peak: weights loaded, allocator arenas, activations,
    library code first touched, every thread's work. It does not count pages already resident
    at the start (free heap pages the allocator reuses, shared libraries loaded before), and
    other threads of this process count too. Kernel page granularity (4 KiB).

    Returns:
        (fn's result, peak - baseline in bytes), or (fn's result, None) where /proc or
        clear_refs is unavailable (not Linux, or not writable).
    """
    gc.collect()
    _malloc_trim()
    try:
        _CLEAR_REFS.write_text("5")
        baseline = _status_kib("VmRSS")
    except (OSError, KeyError, ValueError):
        return fn(), None
    result = fn()
    try:
        peak = _status_kib("VmHWM")
    except (OSError, KeyError, ValueError):
        return result, None
    return result, max(0, peak - baseline) * 1024


def token_accuracy(runner: Any, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Next-token top-1 accuracy of ``runner`` over every position of ``windows`` (N, T + 1):
    inputs ``windows[:, :-1]``, targets ``windows[:, 1:]``.

    Raises:
        ValueError: ``windows`` is not (N >= 1, T + 1 >= 2), or batch_size < 1.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N >= 1, T + 1 >= 2), got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    correct = 0
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i:i + batch_size].long()
        pred = runner.logits(chunk[:, :-1]).argmax(-1)  # (b, T)
        correct += int((pred == chunk[:, 1:]).sum())
    return correct / (windows.shape[0] * (windows.shape[1] - 1))


def parity(runner: Any, reference_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Compare ``runner.logits(ids)`` with ``reference_logits`` (B, T, V).

    Returns:
        max_abs_diff; max_rel_diff = max_abs_diff / max |reference| (relative to the logit
        scale: an element-wise ratio explodes near zero); argmax_agreement: the fraction of
        positions whose top token agrees.
    Raises:
        ValueError: the shapes differ.
    """
    got = runner.logits(ids).float()
    ref = reference_logits.detach().float().cpu()
    if got.shape != ref.shape:
        raise ValueError(f"runner logits have shape {tuple(got.shape)}, reference {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(float(ref.abs().max()), 1e-12),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
