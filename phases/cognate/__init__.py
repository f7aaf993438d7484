"""Phase 1, Cognate: the HF-registered decoder family with ACT halting (Graves 2016) and
Titans-style memory (Behrouz et al. 2024/2025), exact parameter targets, and the shared
warm-up + three specialisations (reasoning / memory / adaptive) of the reference's TinyTitan.

Importing this package registers ``model_type="cognate"`` with ``AutoConfig`` and
``AutoModelForCausalLM``; from then on ``AutoModelForCausalLM.from_pretrained(dir)`` and
``.generate()`` work on any Cognate output directory without ``trust_remote_code``. A process
that loads such a directory must import ``phases.cognate`` first.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .act import ACTPonder, halting_weights
from .config import DEFAULT_VARIANTS, CognateConfig, VariantConfig
from .memory import TitansMemory, associative_grad, memory_update, surprise
from .modeling import CognateCausalLMOutput, CognateForCausalLM, CognateModel, CognateModelConfig
from .sizing import count_params, pick_heads, solve_shape
from .train import (
    build_model_config,
    evaluate_model,
    model_vocab_size,
    resolve_shape,
    save_model_dir,
    specialize,
    warmup,
)

AutoConfig.register("cognate", CognateModelConfig, exist_ok=True)
AutoModelForCausalLM.register(CognateModelConfig, CognateForCausalLM, exist_ok=True)

__all__ = [
    "ACTPonder", "halting_weights",
    "DEFAULT_VARIANTS", "CognateConfig", "VariantConfig",
    "TitansMemory", "associative_grad", "memory_update", "surprise",
    "CognateCausalLMOutput", "CognateForCausalLM", "CognateModel", "CognateModelConfig",
    "count_params", "pick_heads", "solve_shape",
    "build_model_config", "evaluate_model", "model_vocab_size", "resolve_shape", "save_model_dir",
    "specialize", "warmup",
]
