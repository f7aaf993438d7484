"""Phase 1, Cognate: the HF-registered decoder family with ACT halting (Graves 2016) and
Titans-style memory (Behrouz et al. 2024/2025), exact parameter targets, and the shared
warm-up + three specialisations (reasoning / memory / adaptive) of the reference's TinyTitan.

Importing ``phases.cognate.modeling`` (which any model name of this package loads) registers
``model_type="cognate"`` with ``AutoConfig`` and ``AutoModelForCausalLM``; from then on
``AutoModelForCausalLM.from_pretrained(dir)`` and ``.generate()`` work on any Cognate output
directory without ``trust_remote_code``. A process that loads such a directory must import
``phases.cognate.modeling`` first.
"""

import importlib
from typing import Any

# Names are loaded on first use (PEP 562): the CLI and the coordinator read CognateConfig
# (phases.cognate.config) without spending seconds importing torch and transformers.
_HOME = {
    **dict.fromkeys(("ACTPonder", "halting_weights"), "act"),
    **dict.fromkeys(("DEFAULT_VARIANTS", "CognateConfig", "VariantConfig"), "config"),
    **dict.fromkeys(("TitansMemory", "associative_grad", "memory_update", "surprise"), "memory"),
    **dict.fromkeys(("CognateCausalLMOutput", "CognateForCausalLM", "CognateModel", "CognateModelConfig"), "modeling"),
    **dict.fromkeys(("count_params", "pick_heads", "solve_shape"), "sizing"),
    **dict.fromkeys(("build_model_config", "evaluate_model", "model_vocab_size", "resolve_shape", "save_model_dir",
                     "specialize", "warmup"), "train"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'phases.cognate' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ACTPonder", "halting_weights",
    "DEFAULT_VARIANTS", "CognateConfig", "VariantConfig",
    "TitansMemory", "associative_grad", "memory_update", "surprise",
    "CognateCausalLMOutput", "CognateForCausalLM", "CognateModel", "CognateModelConfig",
    "count_params", "pick_heads", "solve_shape",
    "build_model_config", "evaluate_model", "model_vocab_size", "resolve_shape", "save_model_dir",
    "specialize", "warmup",
]
