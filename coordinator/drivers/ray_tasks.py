"""Helpers shared by drivers that run phase work as Ray tasks: waiting with progress, history files.

A task reports progress by appending JSON lines to a history file in the phase's ``work/``
folder (on the run folder, which every node reaches); the driver polls those files while it
waits on the tasks with ``ray.wait``. Files, not an actor, because they survive a crash of
either side and give the resumed run the full history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

__all__ = ["HistoryWriter", "read_history", "wait_all", "wait_training"]


class HistoryWriter:
    """Appends ``{"step": s, **metrics}`` lines; used inside tasks as the phase ``log`` callback."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": int(step), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a history file by step; a step logged twice (replayed after a resume) keeps its last row."""
    path = Path(path)
    if not path.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def wait_all(
    refs: dict[str, Any],
    *,
    histories: dict[str, Path],
    total_steps: dict[str, int],
    progress: Callable[[str, int, int], None],
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Wait for every ObjectRef in ``refs`` (name -> ref), reporting progress from the histories.

    Returns:
        name -> the task's return value. Raises the first task error (Ray's exception).
    """
    import ray

    pending = dict(refs)
    out: dict[str, Any] = {}
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=poll_s)
        for name, ref in list(pending.items()):
            if ref in ready:
                out[name] = ray.get(ref)
                del pending[name]
                progress(name, total_steps[name], total_steps[name])
            else:
                rows = read_history(histories[name])
                done = rows[-1]["step"] + 1 if rows else 0
                progress(name, min(done, total_steps[name]), total_steps[name])
    return out


def wait_training(ref: Any, history: Path, steps: int, ctx: Any) -> Any:
    """Wait for one training task (progress from its ``history`` of ``steps`` steps), then log
    the history's rows to the phase (``ctx.log``: W&B and metrics.jsonl). Returns the task's
    return value; raises its error."""
    result = wait_all({"train": ref}, histories={"train": history}, total_steps={"train": max(steps, 1)},
                      progress=ctx.progress)["train"]
    for row in read_history(history):
        ctx.log({k: v for k, v in row.items() if k != "step"}, row["step"])
    return result
