"""Deterministic roles for team tests; imported by the agent actors through their registered paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.roles import register_role


@register_role("t-sum")
class SumRole:
    """Output = payload + the sum of the input outputs: a pure function, so any replay agrees."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        return int(payload or 0) + sum(int(v) for v in inputs.values())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_role("t-broken")
class BrokenRole(SumRole):
    """Always fails: drives the breaker open."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        raise RuntimeError(f"t-broken cannot do {task!r}")


@register_role("t-fail-once")
class FailOnceRole(SumRole):
    """Fails the first time a task runs (a marker file in ``payload['dir']`` remembers), then works."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        marker = Path(payload["dir"]) / f"{task}.failed"
        if not marker.exists():
            marker.write_text("1")
            raise RuntimeError(f"first run of {task!r} fails")
        return int(payload.get("value", 0)) + sum(int(v) for v in inputs.values())


@register_role("t-fail-n")
class FailNRole(SumRole):
    """Fails the first ``payload['fails']`` runs of a task (a counter file in ``payload['dir']``), then works."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        counter = Path(payload["dir"]) / f"{task}.runs"
        runs = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(runs + 1))
        if runs < int(payload["fails"]):
            raise RuntimeError(f"run {runs + 1} of {task!r} fails")
        return int(payload.get("value", 0))


@register_role("t-counter")
class CounterRole(SumRole):
    """Stateful: counts the tasks it ran; the count checkpoints and restores (rollback target)."""

    def __init__(self) -> None:
        self.count = 0

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        if task == "count":
            return self.count
        self.count += 1
        return super().handle(task, payload, inputs)

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


@register_role("t-crash-once")
class CrashOnceRole(SumRole):
    """Kills its own process the first time a task runs (a marker file remembers), then works."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import os

        marker = Path(payload["dir"]) / f"{task}.crashed"
        if not marker.exists():
            marker.write_text("1")
            os._exit(1)
        return int(payload.get("value", 0)) + sum(int(v) for v in inputs.values())


# Four interchangeable workers for the 20-task graph (a team has one agent per role).
@register_role("t-w1")
class W1(SumRole):
    pass


@register_role("t-w2")
class W2(SumRole):
    pass


@register_role("t-w3")
class W3(SumRole):
    pass


@register_role("t-w4")
class W4(SumRole):
    pass
