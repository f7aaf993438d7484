"""Experiment tracking: W&B runs per phase, plus a local metrics history in the run folder.

One W&B group per pipeline run, one W&B run per phase (``job_type`` = the phase name), model
artifacts with aliases ``latest`` (and ``best`` where a phase marks its best model), metric
names as in the reference analysis (``training/loss``, ``model/total_params``, ...).

Offline is the default; runs land in ``RUN/wandb/`` and ``wandb sync RUN/wandb/offline-run-*``
uploads them later. wandb 0.31 cannot ``use_artifact`` offline (it raises TypeError), so
lineage is only declared to W&B when online; it is always recorded in every PhaseResult
(``inputs``) and shown in the report.

Every logged step metric is also appended to ``RUN/NN_phase/metrics.jsonl``, which the
report plots, so nothing depends on W&B being enabled.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from coordinator.config import WandbConfig
from coordinator.runfolder import ArtifactRef, PhaseResult, RunFolder

__all__ = ["Tracker"]

log = logging.getLogger("agentforge")


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


class Tracker:
    """Logs phases of one pipeline run to W&B and to ``metrics.jsonl`` files.

    Args:
        cfg: the ``wandb`` config section.
        run: the run folder.
        group: the W&B group (the run id).
    """

    def __init__(self, cfg: WandbConfig, run: RunFolder, group: str):
        self.cfg = cfg
        self.run = run
        self.group = group
        self._wb: Any = None
        self._history: Path | None = None
        self._step = 0

    def start_phase(self, phase: str, number: int, config: dict[str, Any], inputs: list[ArtifactRef]) -> None:
        self._history = self.run.phase_dir(number, phase) / "metrics.jsonl"
        self._history.unlink(missing_ok=True)  # a re-run phase starts a fresh history
        self._step = 0
        if self.cfg.mode == "disabled":
            return
        import wandb  # heavy; only when tracking is on

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wb = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.group,
            job_type=phase,
            name=f"{self.group}-{number:02d}-{phase}",
            dir=str(self.run.root),
            mode=self.cfg.mode,
            config={"phase": phase, "number": number, **config},
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        if self.cfg.mode == "online":
            for ref in inputs:
                name = _artifact_name(ref)
                try:
                    self._wb.use_artifact(f"{name}:latest")
                except Exception as err:  # noqa: BLE001 - lineage in W&B is best effort
                    log.warning("W&B lineage: could not use artifact %s: %s", name, err)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log step metrics of the running phase (W&B and metrics.jsonl)."""
        step = self._step if step is None else step
        self._step = max(self._step, step + 1)
        scalars = _scalars(metrics)
        if self._history is not None:
            with self._history.open("a") as f:
                f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
        if self._wb is not None:
            self._wb.log(scalars, step=step)

    def log_tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Log tables of the running phase to W&B (name -> rows, each a dict with the same keys);
        the pipeline also writes them to the phase's tables.json."""
        if self._wb is None:
            return
        import wandb

        for name, rows in tables.items():
            columns = list(rows[0]) if rows else []
            data = [[row.get(c) for c in columns] for row in rows]
            self._wb.log({name: wandb.Table(columns=columns, data=data)}, step=self._step)

    def finish_phase(self, result: PhaseResult, run: RunFolder) -> None:
        """Summary metrics, model artifacts with aliases, then close the phase's W&B run."""
        if self._wb is None:
            return
        import wandb

        try:
            self._wb.summary.update({**_scalars(result.metrics), "phase/success": result.success,
                                     "phase/duration_s": result.duration_s})
            if result.success:
                for ref in result.models or ([result.model] if result.model else []):
                    art = wandb.Artifact(_artifact_name(ref), type="model", metadata={
                        "sha256": ref.sha256, "phase": result.phase,
                        "inputs": [i.to_json() for i in result.inputs]})
                    art.add_dir(str(run.resolve(ref)))
                    aliases = ["latest"] + (["best"] if result.model == ref else [])
                    self._wb.log_artifact(art, aliases=aliases)
        finally:
            self._wb.finish(exit_code=0 if result.success else 1)
            self._wb = None

    def close(self) -> None:
        if self._wb is not None:
            self._wb.finish(exit_code=1)
            self._wb = None


def _artifact_name(ref: ArtifactRef) -> str:
    # W&B artifact names allow [A-Za-z0-9_.-]; "01_cognate/models/memory" -> "01_cognate-models-memory".
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in ref.path.strip("/"))[-120:]
