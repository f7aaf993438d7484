"""Sliding windows and SLA math with an injected clock (no Ray); percentiles checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from health.window import SLA, Sample, Window, percentile, summarize


class Clock:
    """A settable clock: tests move time by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("n", [1, 2, 5, 100, 1001])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(n, q):
    values = sorted(np.random.default_rng(n).exponential(0.1, size=n).tolist())
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="linear")), rel=1e-12)


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_window_counts_ratio_and_latency_over_its_horizon():
    clock = Clock()
    w = Window(10.0, clock)
    assert w.stats().calls == 0 and w.success_ratio is None and w.p99 is None
    for i, (ok, lat) in enumerate([(True, 0.1), (True, 0.2), (False, 1.0), (True, 0.3)]):
        clock.t = 1000.0 + i
        w.record(ok, lat)
    s = w.stats()
    assert (s.calls, s.errors, s.success_ratio, s.error_rate) == (4, 1, 0.75, 0.25)
    assert s.p50_latency_s == pytest.approx(np.percentile([0.1, 0.2, 1.0, 0.3], 50))
    assert s.p99_latency_s == pytest.approx(np.percentile([0.1, 0.2, 1.0, 0.3], 99))
    assert s.max_latency_s == 1.0 and s.mean_latency_s == pytest.approx(0.4)
    clock.t = 1010.0  # the first call (t=1000) is exactly horizon old: out; window is (now-10, now]
    assert (w.calls, w.errors) == (3, 1)
    clock.t = 1012.5  # the failure (t=1002) is out
    assert (w.calls, w.errors, w.success_ratio) == (1, 0, 1.0)
    clock.t = 2000.0
    assert w.calls == 0 and w.stats().to_dict()["success_ratio"] is None


def test_window_records_explicit_times_and_validates():
    clock = Clock(100.0)
    w = Window(5.0, clock)
    w.record(True, 0.1, t=99.0)
    w.record(True, 0.1, t=90.0)  # recorded late, already outside the window
    assert w.calls == 1
    with pytest.raises(ValueError, match="latency_s"):
        w.record(True, -1.0)
    with pytest.raises(ValueError, match="latency_s"):
        w.record(True, float("nan"))
    with pytest.raises(ValueError, match="horizon_s"):
        Window(0.0)


def test_window_max_samples_bounds_memory():
    clock = Clock()
    w = Window(1e6, clock, max_samples=3)
    for i in range(10):
        w.record(i % 2 == 0, float(i))
    assert w.calls == 3 and w.stats().max_latency_s == 9.0


def test_sla_per_agent_and_team_pools_calls():
    clock = Clock()
    busy, idle = Window(60.0, clock), Window(60.0, clock)
    for i in range(99):
        busy.record(True, 0.01)
    busy.record(False, 0.5)  # 99/100
    idle.record(False, 0.02)  # 0/1
    sla = SLA(target=0.99)
    a = sla.agent(busy)
    assert a["success_ratio"] == 0.99 and a["met"] is True and a["target"] == 0.99
    assert sla.agent(idle)["met"] is False
    team = sla.team({"busy": busy, "idle": idle})
    # Pooled: 99 of 101 calls, not the mean of 0.99 and 0.0.
    assert team["calls"] == 101 and team["success_ratio"] == pytest.approx(99 / 101)
    assert team["met"] is False and team["violations"] == ["idle"]
    lat = [0.01] * 99 + [0.5, 0.02]
    assert team["p99_latency_s"] == pytest.approx(np.percentile(lat, 99))
    assert SLA(0.99, min_calls=5).agent(idle)["met"] is None  # too few calls to judge
    assert SLA().team({})["success_ratio"] is None and SLA().team({})["met"] is None
    with pytest.raises(ValueError, match="target"):
        SLA(1.5)


def test_summarize_any_order():
    samples = [Sample(3.0, True, 0.3), Sample(1.0, False, 0.1), Sample(2.0, True, 0.2)]
    s = summarize(samples)
    assert (s.calls, s.errors, s.p50_latency_s) == (3, 1, pytest.approx(0.2))
