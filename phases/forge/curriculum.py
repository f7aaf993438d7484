"""The four-stage curriculum of phase 5 (the reference analysis' phase 5 section): which stage a
step is in, its learning rate and whether the Grokfast filter runs.

=============  =========  ===============================================  ========
stage          share      learning rate                                    Grokfast
=============  =========  ===============================================  ========
warmup         10%        linear ramp from lr / n to lr                    off
acceleration   40%        lr                                               on
consolidation  30%        consolidation_multiplier * lr (0.2x)             off
refinement     20%        cosine from 0.2x lr down to 0 at the last step   off
=============  =========  ===============================================  ========

Stage boundaries are ``round(cumulative share * steps)``; a stage can be empty on a short run.
With the curriculum off every step is in one schedule, "constant" (linear warm-up over the
warm-up share, then cosine decay to 0), with Grokfast after the warm-up. Everything here is a
pure function of the step, so a resumed run follows the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from phases.forge.config import CurriculumConfig

__all__ = ["STAGES", "Stage", "stage_at"]

STAGES = ("warmup", "acceleration", "consolidation", "refinement", "constant")


@dataclass(frozen=True)
class Stage:
    """What one step does: its stage, learning-rate multiplier (of ``lr``) and Grokfast switch."""

    name: str
    lr_scale: float
    grokfast: bool

    @property
    def index(self) -> int:
        """The stage's position in ``STAGES`` (what the metric ``forge/stage`` logs)."""
        return STAGES.index(self.name)


def _cosine(start: float, step: int, begin: int, end: int) -> float:
    """``start`` at ``begin`` decaying to 0 at ``end`` (exclusive) along a half cosine."""
    span = max(1, end - begin)
    return start * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - begin) / span)))


def stage_at(cfg: CurriculumConfig, step: int, steps: int) -> Stage:
    """The stage of 0-based ``step`` of a ``steps``-step run.

    Raises:
        ValueError: ``step`` outside [0, steps).
    """
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside the run's steps [0, {steps})")
    warm = round(cfg.warmup * steps)
    if step < warm:
        name = "warmup" if cfg.enabled else "constant"
        return Stage(name, (step + 1) / warm, False)
    if not cfg.enabled:
        return Stage("constant", _cosine(1.0, step, warm, steps), True)
    accel = round((cfg.warmup + cfg.acceleration) * steps)
    if step < accel:
        return Stage("acceleration", 1.0, True)
    consol = round((cfg.warmup + cfg.acceleration + cfg.consolidation) * steps)
    if step < consol:
        return Stage("consolidation", cfg.consolidation_multiplier, False)
    return Stage("refinement", _cosine(cfg.consolidation_multiplier, step, consol, steps), False)
