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
    # per-token log-likelihood gains that form the reward are tiny).
    policy_weight: float = Field(1e6, ge=0.0)
    # loss = w * NLL(no thought) + (1 - w) * NLL(true tokens after the thought) + policy term
    # (the reference's original_loss_weight).
    base_loss_weight: float = Field(0.5, ge=0.0, le=1.0)
    remove_negative_rewards: bool = True  # clamp advantages at 0: only reinforce helpful thoughts

    # -- mixing head -----------------------------------------------------------------------------
    mixing_hidden: int | None = Field(None, ge=1)  # MLP width; None = the model's hidden size

    # -- where thoughts go -----------------------------------------------------------------------
    # "all": a thought after every token (the paper); "hard": only at the hard_fraction of
    # positions where the base model's loss is highest.
    injection: Literal["all", "hard"] = "all"
    hard_fraction: float = Field(0.1, gt=0.0, le=1.0)  # used only with injection "hard"
    # Optional filter against incoherent thoughts: the minimum mean per-token log-probability
    # (under the model, at temperature 1) a sampled thought must have to be kept; it is a
    # log-probability, so <= 0. None: keep every thought.
    coherence_threshold: float | None = Field(None, le=0.0)

    @model_validator(mode="after")
    def _check(self) -> QuietStarConfig:
        if self.n_thoughts == 1 and self.policy_weight > 0:
            raise ValueError(
                "n_thoughts = 1 makes every advantage 0 (the baseline is the mean over a position's "
                "thoughts), so the policy term would never learn: set n_thoughts >= 2 or policy_weight = 0")
        return self
