"""Sliding windows of call outcomes and latencies, and SLA (success ratio) per agent and team.

A :class:`Window` keeps the calls of the last ``horizon_s`` seconds by an injected clock, so it
is pure and deterministic under test. From it come the success ratio (the SLA measure: successful
calls / calls in the window, as in Google's SRE book, "Service Level Objectives") and latency
percentiles. Percentiles use linear interpolation between closest ranks (Hyndman & Fan type 7,
numpy.percentile's default "linear" method), so they can be checked against numpy.

A team's figures pool its agents' calls (call-weighted), not the mean of the agents' ratios:
an idle agent with one failed call must not halve the team's SLA.

Latencies of failed calls are included: a timeout is the slowest call there is.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SLA", "Sample", "Window", "WindowStats", "percentile", "summarize"]


@dataclass(frozen=True)
class Sample:
    """One call: when it ended (clock seconds), whether it succeeded, how long it took."""

    t: float
    ok: bool
    latency_s: float


@dataclass(frozen=True)
class WindowStats:
    """Figures of a set of calls. Latency and ratio fields are None when there were no calls."""

    calls: int
    errors: int
    success_ratio: float | None
    p50_latency_s: float | None
    p95_latency_s: float | None
    p99_latency_s: float | None
    mean_latency_s: float | None
    max_latency_s: float | None

    @property
    def error_rate(self) -> float | None:
        """errors / calls, or None with no calls."""
        return None if self.success_ratio is None else 1.0 - self.success_ratio

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready: None, never NaN), with ``error_rate``."""
        return {**asdict(self), "error_rate": self.error_rate}


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending values, linearly interpolated (type 7).

    Raises:
        ValueError: empty input or ``q`` outside [0, 100].
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    rank = q / 100.0 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def summarize(samples: Iterable[Sample]) -> WindowStats:
    """Figures of ``samples`` (any order)."""
    samples = list(samples)
    if not samples:
        return WindowStats(0, 0, None, None, None, None, None, None)
    latencies = sorted(s.latency_s for s in samples)
    errors = sum(1 for s in samples if not s.ok)
    n = len(samples)
    return WindowStats(
        calls=n,
        errors=errors,
        success_ratio=(n - errors) / n,
        p50_latency_s=percentile(latencies, 50),
        p95_latency_s=percentile(latencies, 95),
        p99_latency_s=percentile(latencies, 99),
        mean_latency_s=math.fsum(latencies) / n,
        max_latency_s=latencies[-1],
    )


class Window:
    """Calls of the last ``horizon_s`` seconds. Not thread-safe: its owner locks.

    Args:
        horizon_s: how far back the window reaches.
        clock: monotonic seconds (``time.monotonic``; tests inject their own).
        max_samples: memory bound; past it the oldest calls drop out early.
    Raises:
        ValueError: a non-positive horizon or max_samples.
    """

    def __init__(self, horizon_s: float, clock: Callable[[], float] = time.monotonic, max_samples: int = 100_000):
        if not (math.isfinite(horizon_s) and horizon_s > 0):
            raise ValueError(f"horizon_s must be a finite number > 0, got {horizon_s!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.horizon_s = float(horizon_s)
        self._clock = clock
        self._samples: deque[Sample] = deque(maxlen=max_samples)

    def record(self, ok: bool, latency_s: float, t: float | None = None) -> None:
        """Add one call that ended at ``t`` (default: now).

        Raises:
            ValueError: a negative or non-finite latency.
        """
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"latency_s must be a finite number >= 0, got {latency_s!r}")
        self._samples.append(Sample(self._clock() if t is None else float(t), bool(ok), float(latency_s)))
        self._evict()

    def _evict(self) -> None:
        cutoff = self._clock() - self.horizon_s
        while self._samples and self._samples[0].t <= cutoff:
            self._samples.popleft()

    def samples(self) -> list[Sample]:
        """The calls inside the window now, oldest first."""
        self._evict()
        # A call recorded with an explicit earlier t can sit behind a newer one: filter as well.
        cutoff = self._clock() - self.horizon_s
        return [s for s in self._samples if s.t > cutoff]

    def stats(self) -> WindowStats:
        """Figures of the calls inside the window now."""
        return summarize(self.samples())

    @property
    def calls(self) -> int:
        return len(self.samples())

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples() if not s.ok)

    @property
    def success_ratio(self) -> float | None:
        return self.stats().success_ratio

    def latency(self, q: float) -> float | None:
        """The ``q``-th latency percentile in the window, or None when it is empty."""
        values = sorted(s.latency_s for s in self.samples())
        return percentile(values, q) if values else None

    @property
    def p50(self) -> float | None:
        return self.latency(50)

    @property
    def p95(self) -> float | None:
        return self.latency(95)

    @property
    def p99(self) -> float | None:
        return self.latency(99)


class SLA:
    """A success-ratio objective, evaluated per agent and per team.

    Args:
        target: the success ratio an agent and a team should meet (0.99: 1 failure in 100).
        min_calls: fewer calls than this in the window say nothing (``met`` is None).
    """

    def __init__(self, target: float = 0.99, min_calls: int = 1):
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target must be in [0, 1], got {target!r}")
        if min_calls < 1:
            raise ValueError(f"min_calls must be >= 1, got {min_calls}")
        self.target, self.min_calls = float(target), int(min_calls)

    def met(self, stats: WindowStats) -> bool | None:
        """Whether ``stats`` meet the target; None with too few calls to tell."""
        if stats.calls < self.min_calls or stats.success_ratio is None:
            return None
        return stats.success_ratio >= self.target

    def agent(self, window: Window) -> dict[str, Any]:
        """One agent: its window figures plus ``target`` and ``met``."""
        stats = window.stats()
        return {**stats.to_dict(), "target": self.target, "met": self.met(stats)}

    def team(self, windows: Mapping[str, Window]) -> dict[str, Any]:
        """A team: figures of all its agents' calls pooled, plus ``target``, ``met`` and the
        roles that miss the target (``violations``)."""
        pooled = summarize(s for w in windows.values() for s in w.samples())
        violations = sorted(role for role, w in windows.items() if self.met(w.stats()) is False)
        return {**pooled.to_dict(), "target": self.target, "met": self.met(pooled), "violations": violations}
