"""Edge-of-chaos control: keep the model's success rate on its training tasks inside a band
(the reference's 55-75%) by moving the tasks' difficulty level up or down.

The success of every task in a training batch is read off that step's forward pass
(:func:`task_successes`: exact match of the answer span, teacher-forced, the same test as
``phases.data.tasks.task_accuracy``). The controller counts them; every ``adjust_every`` steps,
once ``min_tasks`` were scored, it compares the rate with the band, moves one level, and starts
counting afresh. Its state is three integers, saved in the train-state checkpoint, and its
decisions depend only on what the model computed, so a resumed run decides the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from phases.forge.config import EdgeConfig

__all__ = ["EdgeController", "task_successes"]


def task_successes(logits: torch.Tensor, targets: torch.Tensor,
                   spans: Sequence[tuple[int, int, int]]) -> list[bool]:
    """Whether each task's answer was predicted exactly.

    Args:
        logits: (B, T, V) of the inputs ``row[:, :-1]``.
        targets: (B, T) the next tokens ``row[:, 1:]``.
        spans: ``(row, start, end)`` answer spans in row coordinates (``pack_tasks(spans=...)``);
            the token at row position p is predicted at input position p - 1.
    """
    pred = logits.detach().argmax(-1)  # (B, T)
    return [bool(torch.equal(pred[r, s - 1:e - 1], targets[r, s - 1:e - 1])) for r, s, e in spans]


class EdgeController:
    """The difficulty level of the generated training tasks (module docstring)."""

    def __init__(self, cfg: EdgeConfig):
        self.cfg = cfg
        self.level = cfg.start_level
        self.solved = 0
        self.scored = 0
        self.rate: float | None = None  # the success rate of the last completed count

    @property
    def max_operand(self) -> int:
        return self.cfg.levels[self.level]

    def update(self, successes: Sequence[bool], step: int) -> None:
        """Count one step's task results; at the end of every ``adjust_every``-step count (0-based
        ``step`` + 1 a multiple of it) with at least ``min_tasks`` scored, adjust the level."""
        self.solved += sum(successes)
        self.scored += len(successes)
        if (step + 1) % self.cfg.adjust_every or self.scored < self.cfg.min_tasks:
            return
        self.rate = self.solved / self.scored
        if self.rate > self.cfg.high:
            self.level = min(self.level + 1, len(self.cfg.levels) - 1)
        elif self.rate < self.cfg.low:
            self.level = max(self.level - 1, 0)
        self.solved = self.scored = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        rate = -1.0 if self.rate is None else self.rate
        return {"counts": torch.tensor([self.level, self.solved, self.scored], dtype=torch.int64),
                "rate": torch.tensor(rate, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "counts" not in state:
            return
        self.level, self.solved, self.scored = (int(v) for v in state["counts"])
        rate = float(state["rate"])
        self.rate = None if rate < 0 else rate
