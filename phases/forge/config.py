"""Configuration of Phase 5, Forge training.

Settings follow the reference analysis' phase 5 section where it has them: the four-stage
curriculum (warm-up 10%, acceleration 40% with Grokfast, consolidation 30% at 0.2x, refinement
20%), Grokfast EMA (alpha 0.98, lambda 2.0, when enabled), self-model taps at depths 4, 8, 12
of a 12-layer model (here as fractions of the depth) with weight 0.1, dream cycles of 50 steps
every 1000, edge-of-chaos success band 55-75%, a 10% validation split, validation every 100
steps and early stopping after 5 validations without improvement. Its 100,000 steps are for a large model;
the default here is 200 (presets set their own).

Which features are on by default was decided by ``benchmarks/forge_ablations.py`` (README,
"Forge training"), by the issue's rule: a feature that does not help stays available but off.
Measured on ``tiny`` (3 seeds; held-out loss per byte, lower is better), in the pipeline's own
setting (100 steps on phase 4's ternary model) and from scratch (600 steps, a new model):

- the curriculum helps without Grokfast (-0.005 and -0.010, every seed): on;
- Grokfast raises the held-out loss (+0.45 fine-tuning the ternary model, +0.03 to +0.11 from
  scratch): off here (its speed-up is on grokking tasks: ``benchmarks/grokfast.py``);
- edge-of-chaos control lowers the text loss from scratch (-0.04 to -0.08) but not in the
  pipeline (+0.007 to +0.03), and lowers held-out task accuracy in three of four comparisons:
  off;
- dream cycles: no gain (+0.005 to +0.013): off;
- self-modeling: -0.015 from scratch, -0.002 to -0.005 on the ternary model (within the seeds'
  spread): off.

A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from phases.data.config import FrozenConfig
from phases.forge.grokfast import GrokfastConfig
from phases.forge.sources import FORMATS, QualityFilter

__all__ = ["CurriculumConfig", "DreamConfig", "EdgeConfig", "ForgeConfig", "ForgeDataConfig", "SelfModelConfig"]


class CurriculumConfig(FrozenConfig):
    """The four stages, as fractions of the steps (they must sum to 1). Off: one schedule for
    every step (linear warm-up over ``warmup`` of the steps, then cosine decay to 0, Grokfast on
    every step after the warm-up when it is enabled)."""

    enabled: bool = True  # measured to help (module docstring)
    warmup: float = Field(0.1, ge=0.0, le=1.0)  # learning rate ramps from 0 to lr; no Grokfast
    acceleration: float = Field(0.4, ge=0.0, le=1.0)  # lr, with the Grokfast filter
    consolidation: float = Field(0.3, ge=0.0, le=1.0)  # consolidation_multiplier * lr, no filter
    refinement: float = Field(0.2, ge=0.0, le=1.0)  # cosine from consolidation's rate to 0
    consolidation_multiplier: float = Field(0.2, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_total(self) -> CurriculumConfig:
        total = self.warmup + self.acceleration + self.consolidation + self.refinement
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"warmup + acceleration + consolidation + refinement must be 1, got {total:g}")
        return self


class EdgeConfig(FrozenConfig):
    """Edge-of-chaos control of the generated training tasks' difficulty.

    The difficulty level indexes ``levels`` (the largest operand a task draws). The success rate
    is exact match of every training task's answer, read off the training step's own forward
    pass; every ``adjust_every`` steps (once ``min_tasks`` were scored) a rate above ``high``
    raises the level by one and a rate below ``low`` lowers it by one. Off: the tasks keep the
    data section's ``max_operand``.
    """

    enabled: bool = False  # off: no consistent gain measured (module docstring)
    low: float = Field(0.55, ge=0.0, le=1.0)
    high: float = Field(0.75, ge=0.0, le=1.0)
    levels: tuple[int, ...] = (1, 3, 9, 19, 49, 99, 199, 499, 999)
    start_level: int = Field(0, ge=0)
    adjust_every: int = Field(10, ge=1)
    min_tasks: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> EdgeConfig:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if not self.levels or any(b <= a for a, b in zip(self.levels, self.levels[1:])) or self.levels[0] < 1:
            raise ValueError(f"levels must be increasing operands >= 1, got {list(self.levels)}")
        if self.start_level >= len(self.levels):
            raise ValueError(f"start_level {self.start_level} is past the last level ({len(self.levels) - 1})")
        return self


class DreamConfig(FrozenConfig):
    """Dream cycles: every ``every`` steps, the next ``steps`` steps train on rows replayed from
    a buffer of earlier training rows instead of fresh ones (the step budget is the same). The
    buffer is a reservoir sample (Vitter's algorithm R) of every training row seen, so each row
    seen so far is in it with equal probability; a dream batch draws ``batch_size`` distinct
    rows from it uniformly."""

    enabled: bool = False  # off: no gain measured (module docstring)
    every: int = Field(1000, ge=1)
    steps: int = Field(50, ge=1)
    buffer_size: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DreamConfig:
        if self.steps >= self.every:
            raise ValueError(f"steps ({self.steps}) must be below every ({self.every})")
        return self


class SelfModelConfig(FrozenConfig):
    """Self-modeling: linear heads predict, from the hidden state at one tap layer, the model's
    hidden state at the next (deeper) tap layer, at the same position (the target is detached).
    ``taps`` are fractions of the model's depth (the reference's 4, 8, 12 of 12 layers); the
    loss, mean squared error between layer-normalised states, is added with ``weight``. The
    heads are training-only: they are not part of the exported model."""

    enabled: bool = False  # off: no gain beyond the seeds' spread in the pipeline (module docstring)
    taps: tuple[float, ...] = (1 / 3, 2 / 3, 1.0)
    weight: float = Field(0.1, gt=0.0)

    @field_validator("taps")
    @classmethod
    def _check_taps(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) < 2 or any(not 0.0 < t <= 1.0 for t in v) or list(v) != sorted(v):
            raise ValueError(f"taps must be >= 2 increasing fractions in (0, 1], got {list(v)}")
        return v


class ForgeDataConfig(FrozenConfig):
    """Where phase 5's text comes from. No files: the run's corpus (the data section) and its
    held-out split. Files: .txt, .jsonl, .parquet, .arrow/.feather or .h5/.hdf5, streamed
    through the quality filter (``phases/forge/sources.py``) into a token cache with a
    ``validation_fraction`` split (``phases/forge/data.py``)."""

    files: tuple[str, ...] = ()
    text_field: str = "text"
    validation_fraction: float = Field(0.1, gt=0.0, le=0.5)
    quality: QualityFilter = QualityFilter()
    # Share of each batch's rows that are generated tasks (the rest is text).
    task_fraction: float = Field(0.25, ge=0.0, le=1.0)

    @field_validator("files")
    @classmethod
    def _check_files(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, path in enumerate(v):
            if not str(path).lower().endswith(FORMATS):
                raise ValueError(f"file {i} ({path!r}) must end with one of {', '.join(FORMATS)}")
        return v


class ForgeConfig(FrozenConfig):
    """The Forge section: the training run and its features."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int | None = Field(None, ge=2)  # None: the data section's seq_len
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: off
    grokfast: GrokfastConfig = GrokfastConfig()  # off: it raised the held-out loss (module docstring)
    curriculum: CurriculumConfig = CurriculumConfig()
    edge: EdgeConfig = EdgeConfig()
    dream: DreamConfig = DreamConfig()
    self_model: SelfModelConfig = SelfModelConfig()
    data: ForgeDataConfig = ForgeDataConfig()

    # -- validation, early stopping, checkpoints -------------------------------------------------
    eval_every: int = Field(100, ge=1)  # validation loss every this many steps (and at the end)
    eval_batches: int = Field(4, ge=1)  # validation windows: eval_batches * batch_size
    eval_tasks: int = Field(32, ge=0)  # held-out tasks per kind, scored at the start and the end
    # Stop after this many validations in a row without a val loss below the best by min_delta
    # (0: never stop early).
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0.0)
    # Export the weights of the best validation (a copy is kept, and checkpointed, while
    # training) instead of the last step's.
    restore_best: bool = True
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)  # throughput, memory and CPU use (the per-step metrics go every step)
    gpus: float = Field(0.0, ge=0.0)  # > 0: train on CUDA (measurements stay on CPU)
