"""Configuration of Phase 2, EvoMerge: the search (``EvolutionConfig``'s fields, the reference
analysis' defaults), what a candidate is evaluated on, and how trials are placed on the cluster.

A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from phases.evomerge.evolution import EvolutionConfig

__all__ = ["EvoMergeConfig"]


class EvoMergeConfig(EvolutionConfig):
    """The ``evomerge:`` section. The GA's fields (population 8, tournament 3, elitism 2, ...)
    come from :class:`EvolutionConfig`; the rest says how candidates are evaluated and run."""

    # generational: every candidate of a generation is evaluated before the next is bred (the
    # reference's algorithm). continuous: a steady-state GA, a new child as soon as a worker is
    # free, so no worker waits for the slowest trial of its generation.
    mode: Literal["generational", "continuous"] = "generational"
    # continuous: at most this many trials at once, and how far breeding may run ahead of the
    # results (phases/evomerge/steady.py); the search depends on it, never on the cluster's
    # size. None = the population.
    window: int | None = Field(None, ge=1)
    # The base model of task-vector methods (task_arithmetic, ties, dare_*) and slerp:
    # "auto" = the common ancestor the upstream phase names (Cognate's shared warm-up model,
    # artifact ``base_model``), else the first input; "first" = the first input model; or the
    # index of an input model.
    base: Literal["auto", "first"] | int = "auto"
    # Fitness evaluation, the same fixed held-out data for every candidate: perplexity on
    # ``eval_batches`` batches of ``eval_batch_size`` windows, accuracy on ``eval_tasks``
    # generated tasks.
    eval_batch_size: int = Field(8, ge=1)
    eval_batches: int = Field(4, ge=1)
    eval_tasks: int = Field(64, ge=1)
    # Resources of one trial. A fraction of a GPU packs several trials on one card (Ray packs
    # one GPU before the next); 0 = CPU only.
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    # Trials at once; None = as many as the cluster's resources allow.
    max_concurrent: int | None = Field(None, ge=1)
    # Tune's retries of a failed trial (a worker or node lost).
    max_failures: int = Field(2, ge=0)
    # Then new trials for a candidate whose trial Tune gave up on (Tune can give up on a trial
    # lost with its node before max_failures is spent); after them it scores -inf.
    resubmits: int = Field(1, ge=0)
