"""Configuration of Phase 3, Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629).

Defaults follow the reference code (ezelikman/quiet-star, ``modeling_mistral.py`` class defaults
and ``quiet-star-train.py``) where it has them: ``n_ahead_talk=4`` true tokens, REINFORCE
temperature 3, ``policy_loss_beta=1e6``, ``original_loss_weight=0.5``, negative rewards removed.
The reference trains with 2 thoughts per position (``n_passes``); 4 gives a less noisy baseline.

A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from phases.data.config import FrozenConfig

__all__ = ["QuietStarConfig"]


class QuietStarConfig(FrozenConfig):
    """The Quiet-STaR section: thoughts, their sampling, and the loss."""

    # -- thoughts --------------------------------------------------------------------------------
    # Tokens sampled per thought, NOT counting the start/end-of-thought tokens. The paper's
    # shorter settings are selectable: its n_ahead counts start and end, so n_ahead = 12 (the
    # training script) is thought_length 10 and the released 8-ahead model is thought_length 6.
    thought_length: int = Field(32, ge=1, le=256)
    # Thoughts sampled in parallel at every position; the REINFORCE baseline is their mean
    # (the reference's n_passes, 2 there). With 1 thought every advantage is 0.
    n_thoughts: int = Field(4, ge=1, le=16)
    # True future tokens teacher-forced after the thought; the talk loss and the reward cover
    # all of them (the reference's n_ahead_talk).
    n_true: int = Field(4, ge=1)

    # -- sampling --------------------------------------------------------------------------------
    top_p: float = Field(0.9, gt=0.0, le=1.0)  # nucleus: smallest set with this much probability
    temperature: float = Field(1.0, gt=0.0)  # divides the logits before top-p
    # log pi(thought) for the policy gradient uses log_softmax(logits / this) (reference: 3).
    reinforce_temperature: float = Field(3.0, gt=0.0)

    # -- loss ------------------------------------------------------------------------------------
    # Weight of the policy-gradient term (the reference's policy_loss_beta; large because the
    # per-token log-likelihood gains that form the reward are tiny). It goes with the
    # reference's lr 1e-6: at lr 1e-3 on a small model it dominates the clipped gradient and
    # ruins the LM (benchmarks/quietstar.py; the tiny preset uses 1).
    policy_weight: float = Field(1e6, ge=0.0)
    # loss = w * NLL(no thought) + (1 - w) * NLL(true tokens after the thought) + policy term
    # (the reference's original_loss_weight).
    base_loss_weight: float = Field(0.5, ge=0.0, le=1.0)
    remove_negative_rewards: bool = True  # clamp advantages at 0: only reinforce helpful thoughts

    # -- mixing head -----------------------------------------------------------------------------
    mixing_hidden: int | None = Field(None, ge=1)  # MLP width; None = the model's hidden size

    # -- where thoughts go -----------------------------------------------------------------------
    # "all": a thought after every token (the paper); "hard": only at the hard_fraction of
    # positions where the base model's loss (in training; its entropy at inference) is highest,
    # so that only those positions cost thought tokens.
    injection: Literal["all", "hard"] = "all"
    hard_fraction: float = Field(0.1, gt=0.0, le=1.0)  # used only with injection "hard"
    # Threshold filter on the coherence score in [0, 1] (coherence.py says how it is computed;
    # the reference analysis filters below 0.5). A filtered thought adds nothing to the talk
    # loss or the policy gradient. None: keep every thought (the paper); scores are still logged.
    coherence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    context_window: int = Field(16, ge=1)  # tokens up to the anchor that semantic similarity compares with

    # -- start/end-of-thought tokens -------------------------------------------------------------
    start_token: str = "<|startthought|>"
    end_token: str = "<|endthought|>"
    # Their embeddings start as the mean embedding of this text's tokens (the reference: "---")
    # and are stored divided by embedding_scale, which multiplies their effective learning rate.
    delimiter_init: str = "---"
    embedding_scale: float = Field(100.0, gt=0.0)

    # -- training (the reference: AdamW lr 1e-6, wd 0.001, warm-up 20, clip 1.0, batch 8) -------
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int | None = Field(None, ge=2)  # None: the data section's seq_len
    lr: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.001, ge=0.0)
    lr_warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: off
    checkpoint_every: int = Field(100, ge=1)  # the reference analysis: every 100 steps
    log_every: int = Field(10, ge=1)

    # -- parallelism -----------------------------------------------------------------------------
    # Data-parallel Ray Train workers (1: one Ray task); batch_size must be divisible by it.
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0.0)  # > 0: train on CUDA, e.g. 0.5 to share a card

    # -- evaluation ------------------------------------------------------------------------------
    eval_batches: int = Field(4, ge=1)  # held-out batches for the loss with and without thoughts
    eval_tasks: int = Field(32, ge=0)  # held-out tasks per kind (0: skip)
    sample_thoughts: int = Field(8, ge=0)  # rows of the sample-thought table in W&B and the report

    @model_validator(mode="after")
    def _check(self) -> QuietStarConfig:
        if self.seq_len is not None and self.seq_len <= self.n_true:
            raise ValueError(f"seq_len ({self.seq_len}) must exceed n_true ({self.n_true}): a thought needs "
                             "n_true true tokens after its position")
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by workers ({self.workers}): "
                             "each data-parallel worker takes an equal share of every batch")
        if self.n_thoughts == 1 and self.policy_weight > 0:
            raise ValueError(
                "n_thoughts = 1 makes every advantage 0 (the baseline is the mean over a position's "
                "thoughts), so the policy term would never learn: set n_thoughts >= 2 or policy_weight = 0")
        return self
