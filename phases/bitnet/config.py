"""Configuration of Phase 4, BitNet b1.58 quantization-aware training.

Defaults follow the reference analysis' phase 4 section where it has them: 100 calibration
samples (it suggests 1K-10K for better statistics: raise ``calibration_samples``), QAT of 100 to
1000 steps (100 here), Grokfast available for the fine-tuning (off by default: its benefit on
QAT is unmeasured). The learning rate is BitNet b1.58 2B4T's late-stage rate (5e-4, the notes'
section 1); lm_head stays in full precision as in every BitNet release. Activations are 8-bit (what the
packed inference path multiplies).

A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from phases.data.config import FrozenConfig
from phases.forge.grokfast import GrokfastConfig

__all__ = ["BitNetConfig"]


class BitNetConfig(FrozenConfig):
    """The BitNet section: which layers become ternary, calibration, QAT and storage."""

    # -- which layers ----------------------------------------------------------------------------
    # Linear layers that stay in full precision: a name matches when equal to an entry or ending
    # in "." + it. Embeddings are never Linear and always stay.
    keep: tuple[str, ...] = ("lm_head",)
    # SubLN (an RMSNorm before the attention output and MLP down projections, as BitNet b1.58
    # places them), Cognate models only; its gains start at the RMS calibration measured there,
    # so the model starts close to its input. Off by default: added to an already trained model
    # it costs accuracy that a short QAT does not win back (tiny, 3 seeds: retention 0.938-0.973
    # with it, 0.985-0.996 without; benchmarks/bitnet_qat.py). Turn it on for long QAT or a
    # model trained as BitNet. Other model types raise an error with it on.
    sub_norm: bool = False

    # -- calibration -----------------------------------------------------------------------------
    calibration_samples: int = Field(100, ge=1)  # training windows whose activations are recorded
    calibration_rows: int = Field(512, ge=16)  # input rows kept per layer for the threshold search
    # Per-layer sparsity thresholds (Ternary Weight Networks' form, quant.py): for each layer the
    # grid value (times mean|w|) whose ternary weight best reproduces the layer's outputs on the
    # calibration inputs. Off: BitNet's absmean quantizer everywhere.
    sparsity_thresholds: bool = False
    threshold_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    # -- QAT -------------------------------------------------------------------------------------
    steps: int = Field(100, ge=0)  # 0: quantize without fine-tuning
    batch_size: int = Field(8, ge=1)
    seq_len: int | None = Field(None, ge=2)  # None: the data section's seq_len
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: off
    grokfast: GrokfastConfig = GrokfastConfig()
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    gpus: float = Field(0.0, ge=0.0)  # > 0: calibrate and train on CUDA (measurements stay on CPU)

    # -- storage ---------------------------------------------------------------------------------
    # "base3": 5 trits per byte, 1.6 bits per weight; "2bit": 4 per byte (I2_S-like).
    packing: Literal["2bit", "base3"] = "base3"

    # -- evaluation and profile ------------------------------------------------------------------
    eval_batches: int = Field(4, ge=1)  # held-out batches of batch_size windows
    eval_tasks: int = Field(32, ge=0)  # held-out tasks per kind (0: skip)
    profile_batch: int = Field(4, ge=1)  # the fixed batch timed for latency and memory
    profile_seq_len: int = Field(64, ge=1)
    profile_repeats: int = Field(10, ge=1)
    # The packed layers' kernel for the measured latency and memory (phases/bitnet/packed.py):
    # "decode" (1.6-2 bits per weight in memory) or "int8" (x86 only: about 2x faster, 8 bits).
    kernel: Literal["decode", "int8"] = "decode"

    @model_validator(mode="after")
    def _check(self) -> BitNetConfig:
        if any(not 0.0 < t < 2.0 for t in self.threshold_grid) or not self.threshold_grid:
            raise ValueError(f"threshold_grid needs values in (0, 2), got {list(self.threshold_grid)}")
        return self
