"""Checks shared by the tests of the phases that train with train-state checkpoints
(``phases/training.py``): an interrupted run resumes from its last checkpoint, and a checkpoint
written for another config is refused without being touched."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import PhaseError

LogFn = Callable[[dict, int], None]


class Crash(Exception):
    """Raised by the log callback to stop a run mid-training."""


def interrupt_then_resume(run: Callable[[Path, LogFn | None], Any], root: Path, *, crash_step: int,
                          checkpoints_left: list[str]) -> None:
    """``run(root, log)`` crashed when it logs ``crash_step`` (after that step's update, before
    its checkpoint), ``root/work`` checked to hold exactly ``checkpoints_left``, then run again to
    the end (it resumes); the caller compares the outputs with an uninterrupted run's."""

    def crash(metrics: dict, step: int) -> None:
        if step == crash_step:
            raise Crash

    with pytest.raises(Crash):
        run(root, crash)
    assert sorted(p.name for p in (root / "work").glob("ckpt-*.json")) == checkpoints_left
    run(root, None)


def foreign_checkpoint_is_refused(work: Path, root: Path, run_other_config: Callable[[Path], Any]) -> None:
    """A copy of ``work`` (another run's checkpoints) in ``root/work``: ``run_other_config(root)``
    raises PhaseError naming the different config and leaves every file as it was."""
    shutil.copytree(work, root / "work")
    before = sorted(p.name for p in (root / "work").iterdir())
    with pytest.raises(PhaseError, match="different config"):
        run_other_config(root)
    assert sorted(p.name for p in (root / "work").iterdir()) == before
