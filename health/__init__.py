"""Health monitoring of agent teams: heartbeats, SLA accounting, ray.util.metrics, health reports.

- :mod:`health.window`: ``Window`` (sliding window of call outcomes and latencies, injected
  clock) and ``SLA`` (success ratio per agent and per team). Pure; no Ray.
- :mod:`health.metrics`: ``Metrics``, the six ``agentforge_*`` Ray metrics, built once per process.
- :mod:`health.monitor`: ``HealthMonitor`` (heartbeats with ``ray.wait`` timeouts, unhealthy
  transitions and callbacks, the health log, report JSON, W&B metrics).

Names load lazily (PEP 562), so ``import health.window`` does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY_NAMES = {
    "Window": "health.window",
    "WindowStats": "health.window",
    "SLA": "health.window",
    "Metrics": "health.metrics",
    "HealthMonitor": "health.monitor",
    "health_paths": "health.monitor",
}

__all__ = list(_LAZY_NAMES)


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'health' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
