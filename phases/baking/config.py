"""Configuration of Phase 6, tool and persona baking: the ``baking:`` section.

Defaults: Toolformer's filter threshold tau_f = 1.0 (Schick et al. 2023); the reference's persona
traits (helpfulness 0.9, creativity 0.7, precision 0.8); Prompt Baking's learning rate scale and
sampled continuations (Bhargava et al. 2024; the paper bakes with LoRA, ``persona_method: lora``).
Step counts are sized for the tiny models this repo trains; see README for what they measured.

A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from phases.data.config import FrozenConfig

__all__ = ["BakingConfig", "TOOL_NAMES"]

TOOL_NAMES = ("calculator", "lookup")  # the tools phases/baking/tools.py registers


class BakingConfig(FrozenConfig):
    """The ``baking:`` section."""

    # -- tool baking (Toolformer) -------------------------------------------------------------------
    tools: tuple[Literal["calculator", "lookup"], ...] = TOOL_NAMES
    tool_questions: int = Field(240, ge=2)  # generated training questions, split over the tools
    eval_questions: int = Field(40, ge=2)  # held-out questions (their lookup keys are never trained on)
    heldout_key_fraction: float = Field(0.25, gt=0.0, lt=1.0)  # knowledge keys kept for the held-out set
    max_operand: int = Field(99, ge=1)  # calculator questions draw operands from [0, max_operand]
    filter_threshold: float = 1.0  # tau_f: keep a call iff it lowers the weighted loss by this much
    # The filter's judge: the input model after this many steps on every valid candidate (0: the input
    # model as it is; phases/baking/tooldata.py says why a tiny model needs the warm-up).
    filter_warmup_steps: int = Field(100, ge=0)
    # Share of each fine-tune batch that is plain training text (Toolformer fine-tunes on the whole
    # augmented corpus, mostly text without calls): keeps the language model from being overwritten.
    text_fraction: float = Field(0.5, ge=0.0, lt=1.0)
    tool_steps: int = Field(300, ge=0)
    tool_lr: float = Field(1e-3, gt=0)
    tool_batch_size: int = Field(8, ge=1)
    mask_results: bool = True  # the tool writes its result at inference: no loss on those tokens
    max_calls: int = Field(2, ge=0)  # calls the inference loop executes per prompt
    max_new_tokens: int = Field(48, ge=1)  # per generation step of the inference loop

    # -- persona baking (Prompt Baking) -------------------------------------------------------------
    traits: dict[str, float] = Field(default_factory=lambda: {"helpfulness": 0.9, "creativity": 0.7,
                                                              "precision": 0.8})
    persona_method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, ge=1)
    persona_questions: int = Field(16, ge=1)  # prefixes of training text the continuations follow
    persona_question_tokens: int = Field(8, ge=1)  # tokens of each prefix
    persona_samples: int = Field(4, ge=1)  # continuations sampled per question from the prompted model
    # Tokens per continuation. The teacher reads the persona prompt + prefix + continuation: that must
    # fit the model's positions (the phase says so if it does not).
    persona_length: int = Field(16, ge=1)
    persona_temperature: float = Field(1.0, gt=0)
    persona_steps: int = Field(60, ge=0)
    persona_lr: float = Field(3e-4, gt=0)
    persona_batch_size: int = Field(4, ge=1)

    # -- quality gate (the validator) ---------------------------------------------------------------
    # Held-out LM perplexity of the baked model over the input's: baking must not wreck the LM.
    max_perplexity_ratio: float = Field(1.5, gt=1.0)
    # Tool-call accuracy after minus before on the held-out questions must be at least this.
    min_tool_gain: float = 0.0
    eval_batch_size: int = Field(8, ge=1)
    eval_batches: int = Field(4, ge=1)

    # -- inference and memory optimisers ------------------------------------------------------------
    # An optimisation is applied only when it keeps the outputs (parity) and is at least this much
    # faster, measured on the machine the team runs on; else it is reported and not applied. On a
    # shared 2-core machine a tiny model's forward timings vary by about 10% from run to run.
    min_speedup: float = Field(1.10, gt=0)
    compile: bool = True  # measure torch.compile (its compile time is reported separately)
    # Activation checkpointing is applied to the fine-tunes when one training step's activations
    # exceed this budget (MiB); below it, it only costs time.
    memory_budget_mb: float = Field(1024.0, gt=0)
    tie_tolerance: float = Field(0.01, ge=0)  # tying lm_head to the embeddings: max relative loss rise
    min_agreement: float = Field(0.99, ge=0, le=1)  # top-1 agreement a lower dtype must keep
    profile_repeats: int = Field(10, ge=1)
    profile_prompts: int = Field(8, ge=1)  # prompts the generation measurements decode
    profile_new_tokens: int = Field(16, ge=1)  # tokens each of them decodes

    # -- the team -----------------------------------------------------------------------------------
    agent_cpus: float = Field(0.1, gt=0)  # each of the nine agents reserves this much
    task_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> BakingConfig:
        if not self.tools:
            raise ValueError(f"tools must name at least one of {TOOL_NAMES}")
        if len(set(self.tools)) != len(self.tools):
            raise ValueError(f"tools lists a tool twice: {list(self.tools)}")
        bad = {k: v for k, v in self.traits.items() if not 0.0 <= v <= 1.0}
        if not self.traits or bad:
            raise ValueError(f"traits must map trait names to values in [0, 1]; got {bad or 'none'}")
        return self
