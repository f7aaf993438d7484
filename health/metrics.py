"""Agent Forge's custom Ray metrics (``ray.util.metrics``), exported by every Ray node.

Ray's metrics agent on each node serves Prometheus text at
``http://NODE:<metrics_export_port>/metrics`` (``ray.init(_metrics_export_port=...)`` or
``ray start --metrics-export-port``); the dashboard's Metrics view and Grafana read it.
Facts for Ray 2.60 (src: ray/util/metrics.py; doc/source/ray-observability/user-guides/
add-app-metrics.rst; verified by tests/health/test_metrics.py):

- Names must match ``^[a-zA-Z_:][a-zA-Z0-9_:]*$`` or Ray drops the metric with only a warning, and
  ``:`` draws a FutureWarning; so ours are lower-case ``[a-z_]`` only, checked at import.
- Prometheus sees them with a ``ray_`` prefix, and counters with the ``_total`` suffix of the
  OpenMetrics convention: ``agentforge_agent_calls`` is scraped as ``ray_agentforge_agent_calls_total``.
- ``tag_keys`` must be a tuple of str (TypeError otherwise); every tag key needs a str value on
  every record (ValueError otherwise). ``Counter.inc`` refuses values <= 0.
- Records are exported every ``metrics_report_interval_ms`` (10 s by default, at least 1 s).
- Metric objects may be created before ``ray.init`` and keep working across ``ray.shutdown``/
  ``ray.init`` in one process; each process exports its own series (the ``WorkerId`` label).

So :class:`Metrics` is built once per process (:meth:`Metrics.get`), in the driver or an actor.
The coordinator and the health monitor record here from the caller's side, which sees what the
agent cannot: timeouts, dead actors and calls refused by an open breaker.
"""

from __future__ import annotations

import re
import threading

from ray.util.metrics import Counter, Gauge, Histogram

__all__ = ["BREAKER_STATES", "LATENCY_BOUNDARIES_S", "METRIC_NAMES", "Metrics"]

# Breaker state -> gauge value; the names are pybreaker's (STATE_CLOSED/HALF_OPEN/OPEN).
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
# Seconds; from a no-op call through the coordinator (~1 ms) to a long training task (1 min).
LATENCY_BOUNDARIES_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
METRIC_NAMES = {
    "calls": "agentforge_agent_calls",
    "failures": "agentforge_agent_failures",
    "recoveries": "agentforge_recoveries",
    "breaker": "agentforge_breaker_state",
    "healthy": "agentforge_agent_healthy",
    "latency": "agentforge_task_latency_seconds",
}
_PROMETHEUS_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")  # stricter than Ray's: no ':'
assert all(_PROMETHEUS_NAME.match(n) for n in METRIC_NAMES.values())  # invariant of this table


class Metrics:
    """The six Agent Forge metrics; use :meth:`get` for the process-wide instance."""

    _instance: Metrics | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        agent = ("team", "role")
        self.calls = Counter(METRIC_NAMES["calls"], description="Agent task calls by outcome (ok or a failure kind).",
                             tag_keys=(*agent, "outcome"))
        self.failures = Counter(METRIC_NAMES["failures"], description="Failed agent task calls by kind.",
                                tag_keys=(*agent, "kind"))
        self.recoveries = Counter(METRIC_NAMES["recoveries"], description="Recovery actions by strategy.",
                                  tag_keys=(*agent, "strategy"))
        self.breaker_state = Gauge(METRIC_NAMES["breaker"],
                                   description="Circuit breaker state: 0 closed, 1 half-open, 2 open.", tag_keys=agent)
        self.agent_healthy = Gauge(METRIC_NAMES["healthy"], description="1 if the agent answers heartbeats, else 0.",
                                   tag_keys=agent)
        self.latency = Histogram(METRIC_NAMES["latency"], description="Agent task latency seen by the caller (s).",
                                 boundaries=list(LATENCY_BOUNDARIES_S), tag_keys=agent)

    @classmethod
    def get(cls) -> Metrics:
        """The process-wide instance (Ray registers a metric per process, so build it once)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def call(self, team: str, role: str, outcome: str, latency_s: float | None = None) -> None:
        """Count one call (``outcome``: ``"ok"`` or a failure kind) and observe its latency."""
        tags = {"team": str(team), "role": str(role)}
        self.calls.inc(1.0, tags={**tags, "outcome": str(outcome)})
        if latency_s is not None and latency_s >= 0:
            self.latency.observe(float(latency_s), tags=tags)

    def failure(self, team: str, role: str, kind: str) -> None:
        """Count one failure of ``kind`` (e.g. ``timeout``, ``actor_died``, ``task_error``)."""
        self.failures.inc(1.0, tags={"team": str(team), "role": str(role), "kind": str(kind)})

    def recovery(self, team: str, role: str, strategy: str) -> None:
        """Count one recovery action (``retry``, ``fallback``, ``restart``, ``isolate``, ...)."""
        self.recoveries.inc(1.0, tags={"team": str(team), "role": str(role), "strategy": str(strategy)})

    def breaker(self, team: str, role: str, state: str | int) -> None:
        """Set the breaker gauge from pybreaker's state name or its number (0, 1, 2).

        Raises:
            ValueError: an unknown state.
        """
        value = BREAKER_STATES.get(state) if isinstance(state, str) else state
        if value not in BREAKER_STATES.values():
            raise ValueError(f"unknown breaker state {state!r}; valid: {sorted(BREAKER_STATES)} or 0, 1, 2")
        self.breaker_state.set(float(value), tags={"team": str(team), "role": str(role)})

    def healthy(self, team: str, role: str, healthy: bool) -> None:
        """Set the agent-healthy gauge (1 or 0)."""
        self.agent_healthy.set(1.0 if healthy else 0.0, tags={"team": str(team), "role": str(role)})
