"""The run folder: the durable record of one pipeline run.

Layout (DESIGN.md, "Contracts")::

    RUN/pipeline.json          config, seed, versions, phase states
    RUN/NN_phase/result.json   the PhaseResult, written last (after its artifacts)
    RUN/NN_phase/...           the phase's artifacts (model dirs, histories, ...)
    RUN/NN_phase/work/         the phase's own checkpoints, kept for resume
    RUN/report.html            tables and plots
    RUN/wandb/                 W&B (offline) runs

Paths inside JSON files are relative to RUN, so a run folder can be moved or mounted
elsewhere (an actor restarted on another node reads the same folder over a shared file
system). Every write is atomic (temp file, fsync, rename) through ``serialization``.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from coordinator.errors import ArtifactError
from serialization.checkpoint import atomic_write_json, sha256_path

__all__ = ["ArtifactRef", "PhaseResult", "RunFolder", "now_iso", "versions"]

SCHEMA_VERSION = 1


def now_iso() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers, recorded in pipeline.json."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "ray", "safetensors", "numpy", "agentforge"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class ArtifactRef:
    """A file or directory in the run folder and its sha256 (``serialization.sha256_path``)."""

    path: str  # relative to the run folder when inside it, else absolute
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ArtifactRef":
        return cls(path=str(data["path"]), sha256=str(data["sha256"]))


@dataclass
class PhaseResult:
    """What a phase produced; written as ``RUN/NN_phase/result.json``.

    ``model`` is the phase's primary output model (an HF directory), ``models`` every output
    model in order (phase 1 makes three), ``inputs`` the models it consumed (lineage).
    """

    success: bool
    phase: str
    number: int
    model: ArtifactRef | None = None
    models: list[ArtifactRef] = field(default_factory=list)
    inputs: list[ArtifactRef] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    started: str = ""
    ended: str = ""
    error: str | None = None
    degraded: str | None = None
    # Structured detail of ``error`` when the exception carries it (a team's escalation: team,
    # task, role, failure kind, strategies tried), and what the pipeline did next.
    failure: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "success": self.success,
            "phase": self.phase,
            "number": self.number,
            "model": self.model.to_json() if self.model else None,
            "models": [m.to_json() for m in self.models],
            "inputs": [m.to_json() for m in self.inputs],
            "metrics": self.metrics,
            "artifacts": {k: v.to_json() for k, v in self.artifacts.items()},
            "config": self.config,
            "duration_s": self.duration_s,
            "started": self.started,
            "ended": self.ended,
            "error": self.error,
            "degraded": self.degraded,
            "failure": self.failure,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PhaseResult":
        return cls(
            success=bool(data["success"]),
            phase=str(data["phase"]),
            number=int(data["number"]),
            model=ArtifactRef.from_json(data["model"]) if data.get("model") else None,
            models=[ArtifactRef.from_json(m) for m in data.get("models", [])],
            inputs=[ArtifactRef.from_json(m) for m in data.get("inputs", [])],
            metrics=dict(data.get("metrics", {})),
            artifacts={k: ArtifactRef.from_json(v) for k, v in data.get("artifacts", {}).items()},
            config=dict(data.get("config", {})),
            duration_s=float(data.get("duration_s", 0.0)),
            started=str(data.get("started", "")),
            ended=str(data.get("ended", "")),
            error=data.get("error"),
            degraded=data.get("degraded"),
            failure=data.get("failure"),
        )

    def all_refs(self) -> list[tuple[str, ArtifactRef]]:
        """Every artifact this result names, as (label, ref), models first."""
        refs = [(f"model[{i}]", m) for i, m in enumerate(self.models)]
        if self.model and self.model not in self.models:
            refs.insert(0, ("model", self.model))
        refs += [(f"artifact {k!r}", v) for k, v in self.artifacts.items()]
        return refs


class RunFolder:
    """Reads and writes one run folder. All paths it returns are absolute."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # -- layout -----------------------------------------------------------------------------
    @property
    def pipeline_file(self) -> Path:
        return self.root / "pipeline.json"

    def phase_dir(self, number: int, phase: str) -> Path:
        return self.root / f"{number:02d}_{phase}"

    def result_file(self, number: int, phase: str) -> Path:
        return self.phase_dir(number, phase) / "result.json"

    def work_dir(self, number: int, phase: str) -> Path:
        return self.phase_dir(number, phase) / "work"

    def exists(self) -> bool:
        return self.pipeline_file.exists()

    # -- references -------------------------------------------------------------------------
    def ref(self, path: str | Path) -> ArtifactRef:
        """Hash ``path`` and return a reference to it (relative when inside the run folder)."""
        p = Path(path).resolve()
        try:
            rel = str(p.relative_to(self.root))
        except ValueError:
            rel = str(p)
        return ArtifactRef(path=rel, sha256=sha256_path(p))

    def resolve(self, ref: ArtifactRef) -> Path:
        p = Path(ref.path)
        return p if p.is_absolute() else self.root / p

    def verify_ref(self, ref: ArtifactRef) -> None:
        """Raises ArtifactError when the artifact is missing or its hash differs."""
        p = self.resolve(ref)
        if not p.exists():
            raise ArtifactError(str(p), "missing")
        actual = sha256_path(p)
        if actual != ref.sha256:
            raise ArtifactError(str(p), f"sha256 {actual[:16]}... != recorded {ref.sha256[:16]}...")

    # -- pipeline.json ----------------------------------------------------------------------
    def create(self, *, run_id: str, config: dict[str, Any], seed: int, plan: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = {
            "schema": SCHEMA_VERSION,
            "run_id": run_id,
            "created": now_iso(),
            "seed": seed,
            "config": config,
            "versions": versions(),
            "argv": sys.argv,
            "plan": plan,
            "phases": {name: {"state": "pending"} for name in plan},
            "events": [],
        }
        atomic_write_json(self.pipeline_file, state)

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.pipeline_file.read_text())
        except FileNotFoundError:
            raise ArtifactError(str(self.pipeline_file), "not a run folder (no pipeline.json)") from None
        except json.JSONDecodeError as err:
            raise ArtifactError(str(self.pipeline_file), f"unreadable JSON: {err}") from None

    def set_phase_state(self, phase: str, state: str, **extra: Any) -> None:
        data = self.read_state()
        entry = data["phases"].setdefault(phase, {})
        if state != "failed":  # a phase that runs again must not keep its old failure
            for key in ("error", "then", "failure"):
                entry.pop(key, None)
        entry.update({"state": state, "at": now_iso(), **extra})
        if state in ("done", "failed", "skipped", "rerun"):
            data["events"].append({"at": entry["at"], "phase": phase, "state": state, **extra})
        atomic_write_json(self.pipeline_file, data)

    # -- results ----------------------------------------------------------------------------
    def write_result(self, result: PhaseResult) -> Path:
        """Write result.json; callers write (and hash) every artifact first."""
        path = self.result_file(result.number, result.phase)
        atomic_write_json(path, result.to_json())
        return path

    def read_result(self, number: int, phase: str) -> PhaseResult | None:
        path = self.result_file(number, phase)
        if not path.exists():
            return None
        try:
            return PhaseResult.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ArtifactError(str(path), f"unreadable result: {err}") from None

    def verify_result(self, number: int, phase: str) -> tuple[PhaseResult | None, str | None]:
        """Check a finished phase. Returns (result, None) when it verifies, else (result, reason)."""
        try:
            result = self.read_result(number, phase)
        except ArtifactError as err:
            return None, str(err)
        if result is None:
            return None, "no result.json"
        if not result.success:
            return result, f"the phase failed: {result.error}"
        for label, ref in result.all_refs():
            try:
                self.verify_ref(ref)
            except ArtifactError as err:
                return result, f"{label}: {err}"
        return result, None
