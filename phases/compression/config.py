"""Configuration of Phase 8, final compression: the ``compress:`` section.

A strategy names the stages the compression team runs (``STAGES``); the rest sets each stage's
algorithm. Defaults come from the reference analysis where it has them (distillation
temperature 4.0 and alpha 0.7, the progressive 20/40/60% pruning schedule, the 0.4 compression /
0.6 retention weighting of the recipe search, SeedLM at (C, P, K) = (8, 3, 16)).

A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from phases.data.config import FrozenConfig

__all__ = ["CODECS", "STAGES", "CompressConfig"]

# Weight codecs the quantization agent offers (phases/compression/codecs.py).
# "ternary" (BitNet b1.58 trits) is added by the driver when the input is a ternary (phase-4) model.
CODECS = ("fp16", "int8", "int4", "vptq", "seedlm", "ternary")

# What each strategy runs, in order: prune (to the final sparsity), prune-progressive (the
# schedule, distilling after each step), distill (the student learns from the input model),
# student (a narrower model: the FFN neurons that matter most, then distilled), quantize.
STAGES: dict[str, tuple[str, ...]] = {
    "pruning": ("prune",),
    "quantization": ("quantize",),
    "distillation": ("student", "distill"),
    "hybrid": ("prune", "distill", "quantize"),
    "progressive": ("prune-progressive", "quantize"),
}

Strategy = Literal["pruning", "quantization", "distillation", "hybrid", "progressive"]
Codec = Literal["fp16", "int8", "int4", "vptq", "seedlm", "ternary"]


class CompressConfig(FrozenConfig):
    """The ``compress:`` section."""

    # pruning | quantization | distillation | hybrid (prune, distill, quantize) | progressive
    # (prune 20 -> 40 -> 60% with distillation after each step, then quantize).
    strategy: Strategy = "hybrid"

    # -- pruning ---------------------------------------------------------------------------------
    # magnitude (|w|), taylor (|w * dL/dw| on training batches), structured (whole FFN neurons).
    pruning_method: Literal["magnitude", "taylor", "structured"] = "magnitude"
    sparsity: float = Field(0.6, ge=0.0, lt=1.0)  # final fraction of prunable weights set to zero
    schedule_steps: int = Field(3, ge=1)  # progressive: sparsity/steps more at each step (20/40/60%)
    # The analyzer's sensitivities scale each layer's sparsity: the most sensitive layer is pruned
    # this much less than the mean (0 = the same sparsity everywhere).
    sensitivity_spread: float = Field(0.5, ge=0.0, le=1.0)

    # -- distillation ----------------------------------------------------------------------------
    distill_steps: int = Field(100, ge=0)
    distill_lr: float = Field(1e-3, gt=0)
    distill_batch_size: int = Field(8, ge=1)
    temperature: float = Field(4.0, gt=0)  # softens both distributions (Hinton et al. 2015)
    alpha: float = Field(0.7, ge=0.0, le=1.0)  # weight of the soft (teacher) term vs the labels
    feature_weight: float = Field(0.0, ge=0.0)  # feature-based term (hidden states), 0 = off
    # distillation strategy: the student keeps this fraction of every FFN's neurons.
    student_ff_fraction: float = Field(0.5, gt=0.0, le=1.0)

    # -- quantization ----------------------------------------------------------------------------
    codecs: tuple[Codec, ...] = ("int8", "int4", "vptq", "seedlm")
    int4_group_size: int = Field(32, ge=1)
    vptq_vector_len: int = Field(4, ge=1)
    vptq_centroids: int = Field(256, ge=2)
    vptq_residual_centroids: int = Field(0, ge=0)
    seedlm_block: int = Field(8, ge=1)
    seedlm_latent: int = Field(3, ge=1)
    seedlm_seed_bits: int = Field(16, ge=4, le=24)
    # SeedLM's seed search is exhaustive; when its projected time passes this budget the task
    # falls back to int8 (the team's fallback strategy), and the report says so.
    seedlm_max_seconds: float = Field(900.0, gt=0)
    # Parameters with fewer weights than this stay float16 (norms, biases, gates).
    min_weights: int = Field(256, ge=1)

    # -- recipe search (the architecture optimizer) ------------------------------------------------
    # Trials of NSGA-II over one codec per weight matrix; the uniform recipes (one codec
    # everywhere) are evaluated first. 0: only the uniform recipes.
    search_trials: int = Field(40, ge=0)
    weight_compression: float = Field(0.4, ge=0.0)
    weight_retention: float = Field(0.6, ge=0.0)

    # -- validation gate -------------------------------------------------------------------------
    min_retention: float = Field(0.95, ge=0.0, le=1.0)  # held-out token accuracy vs the input
    max_perplexity_ratio: float | None = Field(None, gt=1.0)
    eval_batch_size: int = Field(8, ge=1)
    eval_batches: int = Field(4, ge=1)
    eval_tasks: int = Field(32, ge=0)

    # -- profiling and packaging ---------------------------------------------------------------
    profile_repeats: int = Field(10, ge=1)
    profile_batch_size: int = Field(1, ge=1)
    onnx: bool = True  # export the compressed model to ONNX and check onnxruntime parity

    # -- the team --------------------------------------------------------------------------------
    # Each of the nine agents reserves this much (0.1: the team fits on one CPU; mostly one agent
    # works at a time, as the graph is a chain with a fan-out of codecs on one agent).
    agent_cpus: float = Field(0.1, gt=0)
    task_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> CompressConfig:
        if not self.codecs and "quantize" in self.stages:
            raise ValueError(f"strategy {self.strategy!r} quantizes: codecs must name at least one of {CODECS}")
        if len(set(self.codecs)) != len(self.codecs):
            raise ValueError(f"codecs lists a codec twice: {list(self.codecs)}")
        if self.weight_compression + self.weight_retention <= 0:
            raise ValueError("weight_compression + weight_retention must be > 0")
        return self

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this strategy runs, in order."""
        return STAGES[self.strategy]
