"""The health monitor of one agent team: heartbeats, call windows, SLA, events, report, metrics.

Heartbeats: :meth:`HealthMonitor.beat_once` sends every agent's ``heartbeat()`` at once and waits
with ``ray.wait(refs, num_returns=len(refs), timeout=...)``, which returns at the timeout without
raising (ray/_private/worker.py ``wait``); so a beat never blocks longer than its timeout. An agent
that has not answered, or whose actor is dead or restarting (``RayActorError``), misses the beat.
A heartbeat still in flight is awaited again next beat rather than sent anew, so a hung agent
does not pile up calls. ``missed_beats_unhealthy`` consecutive misses turn an agent unhealthy and
one answer turns it healthy again; each transition is an event in the health log, a gauge
(``agentforge_agent_healthy``) and a callback to the coordinator, which applies its policy (the
monitor decides nothing else: CONVENTIONS.md rule 6). A changed pid in an answer means the actor
was restarted: counted as a restart seen.

Calls: the coordinator reports each task call with :meth:`record_call` (outcome, latency, failure
kind); those feed the sliding windows (:mod:`health.window`) and :mod:`health.metrics`.

Outputs: the health log (JSON lines, ``RUN/<phase>/health/events.jsonl`` by convention:
:func:`health_paths`), :meth:`report` / :meth:`write_report` (atomic JSON), and
:meth:`wandb_metrics` with keys ``health/<team>/<role>/<metric>`` and ``health/<team>/<metric>``.

Beats may come from the coordinator's loop, from the background thread (:meth:`start`), or both:
all state is under one lock, beats are serialized by another, and callbacks run outside both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray

from health.metrics import BREAKER_STATES, Metrics
from health.window import SLA, Window
from serialization.checkpoint import atomic_write_json

__all__ = ["EVENTS_FILE", "REPORT_FILE", "HealthMonitor", "health_paths"]

logger = logging.getLogger(__name__)

EVENTS_FILE, REPORT_FILE = "events.jsonl", "report.json"
Callback = Callable[[str, dict], None]


def health_paths(phase_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(events.jsonl, report.json)`` under ``phase_dir/health`` (e.g. ``RUN/06_baking``)."""
    root = Path(phase_dir) / "health"
    return root / EVENTS_FILE, root / REPORT_FILE


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class _AgentHealth:
    healthy: bool = True
    missed: int = 0  # consecutive
    missed_total: int = 0
    beats: int = 0
    last_beat_t: float | None = None  # monitor clock
    pid: int | None = None
    node_id: str | None = None
    num_restarts: int = 0  # as the actor reports it (Ray's NumRestarts at its __init__)
    restarts_seen: int = 0  # pid changes the monitor saw
    calls: int = 0
    failures: Tally = field(default_factory=Tally)
    recoveries: Tally = field(default_factory=Tally)
    breaker: str | None = None


class HealthMonitor:
    """Health of one team's agents.

    Args:
        team: the team's name (a tag on every metric and event).
        agents: role -> actor handle (see :meth:`set_agent` / :meth:`remove_agent` for changes).
        interval_s: the background thread's beat period, and the default beat timeout.
        missed_beats_unhealthy: consecutive missed beats that make an agent unhealthy.
        on_unhealthy / on_healthy: ``callback(role, event)`` on each transition.
        clock: monotonic seconds for windows and beat ages (tests inject one).
        window_s: the SLA and latency window.
        sla_target: the success ratio each agent and the team should meet.
        log_path: the health log (JSON lines); None keeps events in memory only.
        metrics: where metrics go (default: the process's :meth:`Metrics.get`).
        max_events: events kept in memory for :meth:`events`.
    """

    def __init__(self, team: str, agents: Mapping[str, Any], *, interval_s: float = 1.0,
                 missed_beats_unhealthy: int = 3, on_unhealthy: Callback | None = None,
                 on_healthy: Callback | None = None, clock: Callable[[], float] = time.monotonic,
                 window_s: float = 60.0, sla_target: float = 0.99, log_path: str | os.PathLike | None = None,
                 metrics: Metrics | None = None, max_events: int = 10_000):
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be a finite number > 0, got {interval_s!r}")
        if missed_beats_unhealthy < 1:
            raise ValueError(f"missed_beats_unhealthy must be >= 1, got {missed_beats_unhealthy}")
        self.team, self.interval_s, self.missed_beats_unhealthy = team, float(interval_s), int(missed_beats_unhealthy)
        self.window_s, self.sla = float(window_s), SLA(sla_target)
        self._on_unhealthy, self._on_healthy, self._clock = on_unhealthy, on_healthy, clock
        self._log_path = Path(log_path) if log_path is not None else None
        self._metrics = metrics if metrics is not None else Metrics.get()
        self._lock = threading.RLock()
        self._beat_lock = threading.Lock()
        self._agents: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}  # role -> heartbeat ObjectRef still in flight
        self._health: dict[str, _AgentHealth] = {}
        self._windows: dict[str, Window] = {}
        self._events: deque[dict] = deque(maxlen=max_events)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        for role, handle in agents.items():
            self.set_agent(role, handle)

    # --- membership ---------------------------------------------------------------------------

    def _state(self, role: str) -> _AgentHealth:
        if role not in self._health:
            self._health[role] = _AgentHealth()
            self._windows[role] = Window(self.window_s, self._clock)
        return self._health[role]

    def set_agent(self, role: str, handle: Any) -> None:
        """Watch ``handle`` as ``role`` (new, or replacing a recreated actor: its beats restart)."""
        with self._lock:
            self._agents[role] = handle
            self._pending.pop(role, None)
            st = self._state(role)
            st.missed = 0
        self._metrics.healthy(self.team, role, st.healthy)

    def remove_agent(self, role: str) -> None:
        """Stop beating ``role`` (isolated); its figures stay in the report."""
        with self._lock:
            self._agents.pop(role, None)
            self._pending.pop(role, None)

    def is_healthy(self, role: str) -> bool:
        """The agent's current health (an unknown role is healthy: nothing says otherwise)."""
        with self._lock:
            return self._health[role].healthy if role in self._health else True

    # --- heartbeats ---------------------------------------------------------------------------

    def beat_once(self, timeout_s: float | None = None) -> dict[str, bool]:
        """Ping every agent at once and wait at most ``timeout_s`` (default ``interval_s``) in all.

        A beat already running in another thread counts against the same budget; if it does not
        finish in time this call returns ``{}`` (that beat speaks for it).
        Returns:
            role -> whether it answered this beat.
        """
        timeout = self.interval_s if timeout_s is None else max(0.0, float(timeout_s))
        deadline = time.monotonic() + timeout
        if not self._beat_lock.acquire(timeout=timeout):
            return {}
        try:
            with self._lock:
                agents = dict(self._agents)
                refs = {role: self._pending.get(role) for role in agents}
            for role, ref in refs.items():
                if ref is None:
                    refs[role] = agents[role].heartbeat.remote()
            if not refs:
                return {}
            remaining = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=remaining)
            ready_set = set(ready)
            answers: dict[str, dict | str] = {}
            for role, ref in refs.items():
                if ref not in ready_set:
                    answers[role] = "timeout"
                    continue
                try:
                    answers[role] = ray.get(ref, timeout=0)
                except ray.exceptions.ActorUnavailableError:  # restarting, or the network flaked
                    answers[role] = "unavailable"
                except ray.exceptions.RayActorError:
                    answers[role] = "dead"
                except ray.exceptions.RayError:
                    answers[role] = "error"
            callbacks = self._apply_beats(agents, refs, answers)
        finally:
            self._beat_lock.release()
        for callback, role, event in callbacks:
            callback(role, event)
        return {role: isinstance(answer, dict) for role, answer in answers.items()}

    def _apply_beats(self, agents: dict[str, Any], refs: dict[str, Any], answers: dict[str, dict | str]) -> list[tuple]:
        callbacks: list[tuple] = []
        now = self._clock()
        with self._lock:
            for role, answer in answers.items():
                if self._agents.get(role) is not agents[role]:
                    continue  # removed or replaced while the beat was in flight
                st = self._state(role)
                if answer == "timeout":
                    self._pending[role] = refs[role]
                else:
                    self._pending.pop(role, None)
                if isinstance(answer, dict):
                    self._on_answer(role, st, answer, now)
                    if not st.healthy:
                        st.healthy = True
                        event = self.record_event({"event": "healthy", "role": role, "pid": st.pid})
                        self._metrics.healthy(self.team, role, True)
                        if self._on_healthy:
                            callbacks.append((self._on_healthy, role, event))
                    continue
                st.missed += 1
                st.missed_total += 1
                if st.healthy:
                    self.record_event({"event": "missed_beat", "role": role, "reason": answer, "consecutive": st.missed})
                if st.healthy and st.missed >= self.missed_beats_unhealthy:
                    st.healthy = False
                    event = self.record_event({"event": "unhealthy", "role": role, "reason": answer,
                                               "missed_beats": st.missed})
                    self._metrics.healthy(self.team, role, False)
                    if self._on_unhealthy:
                        callbacks.append((self._on_unhealthy, role, event))
        return callbacks

    def _on_answer(self, role: str, st: _AgentHealth, beat: dict, now: float) -> None:
        pid = beat.get("pid")
        if st.pid is not None and pid != st.pid:
            st.restarts_seen += 1
            self.record_event({"event": "restart_seen", "role": role, "old_pid": st.pid, "pid": pid,
                               "node_id": beat.get("node_id"), "restored_from": beat.get("restored_from")})
        st.pid, st.node_id = pid, beat.get("node_id")
        st.num_restarts = int(beat.get("restarts") or 0)
        st.missed, st.beats, st.last_beat_t = 0, st.beats + 1, now

    def start(self) -> None:
        """Beat every ``interval_s`` in a daemon thread until :meth:`stop`."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"health-{self.team}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the background thread and wait for it (at most ``timeout_s``)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=self.interval_s * 2 + 1 if timeout_s is None else timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.beat_once(self.interval_s)
            # The thread must outlive a failed beat or callback; the failure is logged and recorded.
            except Exception as exc:
                logger.exception("health monitor of team %s: beat failed", self.team)
                self.record_event({"event": "monitor_error", "error": f"{type(exc).__name__}: {exc}"})
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def __enter__(self) -> HealthMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- calls, recoveries, breakers ------------------------------------------------------------

    def record_call(self, role: str, ok: bool, latency_s: float, kind: str | None = None) -> None:
        """One task call seen by the coordinator; ``kind`` names a failure (default ``"error"``)."""
        outcome = "ok" if ok else (kind or "error")
        with self._lock:
            st = self._state(role)
            st.calls += 1
            if not ok:
                st.failures[outcome] += 1
            self._windows[role].record(ok, max(0.0, float(latency_s)))
        self._metrics.call(self.team, role, outcome, latency_s)
        if not ok:
            self._metrics.failure(self.team, role, outcome)

    def record_recovery(self, role: str, strategy: str, **detail: Any) -> dict:
        """One recovery action the coordinator took; logged as an event. Returns the event."""
        with self._lock:
            self._state(role).recoveries[strategy] += 1
        self._metrics.recovery(self.team, role, strategy)
        return self.record_event({"event": "recovery", "role": role, "strategy": strategy, **detail})

    def set_breaker(self, role: str, state: str) -> None:
        """The agent's breaker state (pybreaker's name); a change is an event and a gauge."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}; valid: {sorted(BREAKER_STATES)}")
        with self._lock:
            st = self._state(role)
            old, st.breaker = st.breaker, state
        self._metrics.breaker(self.team, role, state)
        if old != state:
            self.record_event({"event": "breaker", "role": role, "old": old, "new": state})

    # --- events and reports ---------------------------------------------------------------------

    def record_event(self, event: Mapping[str, Any]) -> dict:
        """Append an event (needs an ``"event"`` name) to the health log; adds time and team.

        Returns:
            The event as written. Values JSON cannot hold are written as their ``str``.
        Raises:
            TypeError: not a mapping with a str ``"event"``.
        """
        if not isinstance(event, Mapping) or not isinstance(event.get("event"), str):
            raise TypeError(f"an event must be a mapping with a str 'event' key, got {event!r}")
        record = {"time": _now_iso(), "team": self.team, **event}
        line = json.dumps(record, default=str, allow_nan=False, sort_keys=True)
        with self._lock:
            self._events.append(record)
            if self._log_path is not None:
                self._log_path.parent.mkdir(parents=True, exist_ok=True)
                # Appends of whole lines; flushed, not fsynced per event (the report is the durable summary).
                with open(self._log_path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
        return record

    def events(self) -> list[dict]:
        """The events kept in memory, oldest first."""
        with self._lock:
            return list(self._events)

    def report(self) -> dict[str, Any]:
        """Health per agent and for the team: calls, failures by kind, SLA over the window,
        p50/p95/p99 latency, beats, restarts, breaker, recoveries. JSON-ready (None, never NaN)."""
        now = self._clock()
        with self._lock:
            agents: dict[str, Any] = {}
            for role, st in sorted(self._health.items()):
                window = self.sla.agent(self._windows[role])
                agents[role] = {
                    "healthy": st.healthy, "watched": role in self._agents, "calls": st.calls,
                    "failures": sum(st.failures.values()), "failures_by_kind": dict(st.failures),
                    "success_ratio": window["success_ratio"], "error_rate": window["error_rate"],
                    "p50_latency_s": window["p50_latency_s"], "p95_latency_s": window["p95_latency_s"],
                    "p99_latency_s": window["p99_latency_s"], "window_calls": window["calls"],
                    "window_errors": window["errors"], "sla_met": window["met"], "missed_beats": st.missed,
                    "missed_beats_total": st.missed_total, "beats": st.beats,
                    "last_beat_age_s": None if st.last_beat_t is None else now - st.last_beat_t,
                    "restarts_seen": st.restarts_seen, "num_restarts": st.num_restarts, "pid": st.pid,
                    "node_id": st.node_id, "breaker": st.breaker, "recoveries": dict(st.recoveries),
                }
            team = self.sla.team(self._windows)
            failures = sum((st.failures for st in self._health.values()), Tally())
            recoveries = sum((st.recoveries for st in self._health.values()), Tally())
            summary = {
                "calls": sum(st.calls for st in self._health.values()), "failures": sum(failures.values()),
                "failures_by_kind": dict(failures), "success_ratio": team["success_ratio"],
                "error_rate": team["error_rate"], "p50_latency_s": team["p50_latency_s"],
                "p95_latency_s": team["p95_latency_s"], "p99_latency_s": team["p99_latency_s"],
                "window_calls": team["calls"], "sla_met": team["met"], "sla_violations": team["violations"],
                "healthy_agents": sum(1 for st in self._health.values() if st.healthy),
                "unhealthy_agents": sorted(r for r, st in self._health.items() if not st.healthy),
                "restarts_seen": sum(st.restarts_seen for st in self._health.values()),
                "recoveries": dict(recoveries),
            }
        return {"schema": 1, "team": self.team, "generated_at": _now_iso(), "window_s": self.window_s,
                "sla_target": self.sla.target, "interval_s": self.interval_s,
                "missed_beats_unhealthy": self.missed_beats_unhealthy, "summary": summary, "agents": agents}

    def write_report(self, path: str | os.PathLike) -> str:
        """Write :meth:`report` as JSON atomically. Returns its sha256. Raises ArtifactError."""
        return atomic_write_json(path, self.report())

    def wandb_metrics(self) -> dict[str, float]:
        """Flat numbers for W&B: ``health/<team>/<role>/<metric>`` and ``health/<team>/<metric>``.

        Metrics without a value yet (no calls in the window) are left out.
        """
        rep = self.report()
        out: dict[str, float] = {}
        base = f"health/{self.team}"
        per_agent = ("success_ratio", "error_rate", "p50_latency_s", "p99_latency_s", "calls", "failures",
                     "missed_beats", "restarts_seen")
        for role, a in rep["agents"].items():
            for key in per_agent:
                if a[key] is not None:
                    out[f"{base}/{role}/{key}"] = float(a[key])
            out[f"{base}/{role}/healthy"] = float(a["healthy"])
            if a["breaker"] is not None:
                out[f"{base}/{role}/circuit_breaker_status"] = float(BREAKER_STATES[a["breaker"]])
        s = rep["summary"]
        for key in ("success_ratio", "error_rate", "p50_latency_s", "p99_latency_s", "calls", "failures",
                    "healthy_agents", "restarts_seen"):
            if s[key] is not None:
                out[f"{base}/{key}"] = float(s[key])
        out[f"{base}/unhealthy_agents"] = float(len(s["unhealthy_agents"]))
        for strategy, n in s["recoveries"].items():
            out[f"{base}/recoveries/{strategy}"] = float(n)
        return out
