"""Configuration of Phase 1, Cognate: model shape, ACT, memory, training and the three variants.

Defaults are the reference's ``small`` model (Agent Forge analysis, Phase 1: "TinyTitan",
25,069,534 parameters, d_model 216, 11 layers, 4 heads, vocab 32,000; variants "reasoning"
ACT threshold 0.95, "memory" 0.90 with 8,192 memory capacity, "adaptive" 0.99; ACT
train-many 8 / infer-few 2). A bad value raises ConfigError naming the field and the
allowed values (see ``phases.data.config.FrozenConfig``).
"""

from __future__ import annotations

import math
import re

from pydantic import field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from coordinator.errors import ConfigError
from phases.data.config import FrozenConfig, TaskMix

__all__ = ["VariantConfig", "CognateConfig", "DEFAULT_VARIANTS"]


def _act_threshold(cls, v: float) -> float:
    """An ACT halting threshold is 1 - eps, so it lies in (0, 1]."""
    if not 0.0 < v <= 1.0:
        raise ValueError(f"must be in (0, 1] (it is 1 - eps), got {v}")
    return v


class VariantConfig(FrozenConfig):
    """How one specialisation differs from the shared base (names and shapes never differ)."""

    act_threshold: float  # ACT halting threshold 1 - eps, in (0, 1]
    memory_enabled: bool = False  # read/write the Titans memory (the module exists in every variant)
    mix: TaskMix = TaskMix()  # data mix of this variant's batches
    context_multiplier: int = 1  # training windows of data.seq_len * this (long context for memory)

    _check_threshold = field_validator("act_threshold")(_act_threshold)

    @field_validator("context_multiplier")
    @classmethod
    def _check_multiplier(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError(f"must be between 1 and 64, got {v}")
        return v


DEFAULT_VARIANTS = {
    # Reasoning: the reference's ACT threshold 0.95; more arithmetic and modular tasks.
    "reasoning": VariantConfig(act_threshold=0.95, mix=TaskMix(text=0.4, arithmetic=0.3, modular=0.2, tool=0.1)),
    # Memory: threshold 0.90 with the memory on; mostly text, on windows twice as long.
    "memory": VariantConfig(act_threshold=0.90, memory_enabled=True, context_multiplier=2,
                            mix=TaskMix(text=0.9, arithmetic=0.04, modular=0.03, tool=0.03)),
    # Adaptive computation: threshold 0.99 (ponders longest); a balanced mix.
    "adaptive": VariantConfig(act_threshold=0.99, mix=TaskMix(text=0.55, arithmetic=0.15, modular=0.15, tool=0.15)),
}

_POSITIVE_INTS = ("max_seq_len", "act_max_steps_train", "act_max_steps_infer", "memory_slots", "memory_chunk",
                  "warmup_steps", "steps", "batch_size", "checkpoint_every", "eval_batches", "loss_window",
                  "log_every", "eval_tasks")


class CognateConfig(FrozenConfig):
    """Phase 1 settings. Shape: give target_params (solved) or d_model/n_layers/n_heads."""

    # --- shape -----------------------------------------------------------------------------
    target_params: int | None = 25_069_534  # exact parameter target; None: use the dims as given
    d_model: int | None = 216  # hidden width; None: searched when target_params is set
    n_layers: int | None = 11  # blocks, the last one pondered by ACT; None: searched
    n_heads: int | None = 4  # attention heads (even head dim); None: head dim nearest 64
    d_ff: int | None = None  # SwiGLU width; None: solved from target_params, else ffn_mult * d_model
    ffn_mult: float = 4.0  # d_ff / d_model when neither d_ff nor target_params fixes it
    tie_embeddings: bool = False  # share the LM head with the input embeddings
    # Embedding rows (the reference's 32,000); None: exactly the tokenizer's vocabulary. Rows
    # beyond the tokenizer's are reserved (BPE on the builtin corpus stops at ~4,300 tokens);
    # a value below the tokenizer's vocabulary is an error.
    vocab_size: int | None = 32_000
    max_seq_len: int = 512  # longest context (recorded in config.json / tokenizer)
    rotary_base: float = 10000.0  # RoPE base
    init_std: float = 0.02  # normal init std (residual outputs scaled by 1/sqrt(2 n_layers))
    # --- ACT (Graves 2016) -------------------------------------------------------------------
    act_max_steps_train: int = 8  # ponder step cap in training ("train many")
    act_max_steps_infer: int = 2  # ponder step cap in eval/generation ("infer few")
    act_halt_bias: float = 1.0  # initial halting bias (positive: ponder little at first)
    ponder_cost: float = 0.01  # tau: loss += tau * mean(N + R)
    base_act_threshold: float = 0.95  # ACT threshold of the shared warm-up / base model
    # --- Titans memory -------------------------------------------------------------------------
    memory_slots: int = 8192  # memory capacity S (reference: 8,192; tiny uses a few dozen)
    memory_dim: int | None = None  # key/value width in memory; None: d_model
    memory_chunk: int = 16  # tokens per memory write (chunk-wise parallel update)
    memory_max_lr: float = 1.0  # upper bound of the data-dependent write step theta
    # --- training --------------------------------------------------------------------------------
    warmup_steps: int = 2000  # shared warm-up steps (the base model all variants start from)
    warmup_mix: TaskMix = TaskMix()  # data mix of the warm-up
    steps: int = 2000  # specialisation steps per variant
    batch_size: int = 16  # rows per step
    lr: float = 6e-4  # AdamW peak learning rate (each stage: linear warm-up, cosine decay)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    lr_warmup_steps: int = 100  # linear lr warm-up steps at the start of each stage
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices and embeddings only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    checkpoint_every: int = 200  # steps between resumable checkpoints in work_dir
    eval_batches: int = 8  # held-out perplexity over eval_batches * batch_size fixed windows
    eval_tasks: int = 64  # held-out tasks scored per kind (capped by data.heldout_tasks)
    loss_window: int = 20  # training/loss = mean over the last loss_window steps
    log_every: int = 10  # steps between log() callbacks
    variants: dict[str, VariantConfig] = DEFAULT_VARIANTS  # name -> specialisation

    @field_validator(*_POSITIVE_INTS)
    @classmethod
    def _check_positive(cls, v: int, info: ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("target_params", "d_model", "n_layers", "n_heads", "d_ff", "memory_dim", "vocab_size")
    @classmethod
    def _check_dims(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1 or null, got {v}")
        return v

    @field_validator("lr", "ffn_mult", "rotary_base", "init_std", "memory_max_lr")
    @classmethod
    def _check_positive_float(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"must be a finite number > 0, got {v}")
        return v

    @field_validator("min_lr_ratio", "beta1", "beta2")
    @classmethod
    def _check_unit(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    _check_threshold = field_validator("base_act_threshold")(_act_threshold)

    @field_validator("ponder_cost", "weight_decay", "grad_clip", "act_halt_bias")
    @classmethod
    def _check_non_negative(cls, v: float, info: ValidationInfo) -> float:
        if info.field_name == "act_halt_bias":
            if abs(v) > 20:
                raise ValueError(f"must be in [-20, 20], got {v}")
        elif not (math.isfinite(v) and v >= 0):
            raise ValueError(f"must be a finite number >= 0, got {v}")
        return v

    @field_validator("lr_warmup_steps")
    @classmethod
    def _check_lr_warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, v: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        if not v:
            raise ValueError("must name at least one variant (default: reasoning, memory, adaptive)")
        bad = [name for name in v if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name)]
        if bad:
            raise ValueError(f"variant names must match [a-z][a-z0-9_-]*, got {bad}")
        return v

    @model_validator(mode="after")
    def _check_together(self) -> "CognateConfig":
        # Cross-field rules raise ConfigError with their own key paths (kept by config_error).
        problems: list[tuple[str, str]] = []
        if self.act_max_steps_infer > self.act_max_steps_train:
            problems.append(("act_max_steps_infer", f"must be <= act_max_steps_train ({self.act_max_steps_train}), "
                                                    f"got {self.act_max_steps_infer}"))
        if self.target_params is None:
            problems.extend((k, "required when target_params is null")
                            for k in ("d_model", "n_layers") if getattr(self, k) is None)
        if self.n_heads is not None and self.d_model is not None:
            if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
                problems.append(("n_heads", f"must divide d_model ({self.d_model}) into an even head "
                                            f"dimension, got {self.n_heads}"))
        if problems:
            raise ConfigError("; ".join(f"{k}: {m}" for k, m in problems), problems)
        return self

    def variant(self, name: str) -> VariantConfig:
        """The settings of variant ``name``.

        Raises:
            ConfigError: key ``variants``, listing the configured names.
        """
        if name not in self.variants:
            msg = f"unknown variant {name!r}; configured variants: {', '.join(self.variants)}"
            raise ConfigError(msg, [("variants", msg)])
        return self.variants[name]
