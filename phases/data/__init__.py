"""Shared data layer of the phases: offline corpus, tokenizers, generated tasks, evaluation.

No data set is downloaded at run time (DESIGN.md, "Data"): the builtin corpus is Python
documentation prose shipped in ``text/`` (PSF license, see ``text/NOTICE.txt``); tasks are
generated with known answers; tokenizers are byte-level or BPE trained offline.
"""

import importlib
from typing import Any

# Names are loaded on first use (PEP 562), so that importing phases.data.config (FrozenConfig,
# the base of every config, used by actors and the coordinator) does not import torch.
_HOME = {
    **dict.fromkeys(("DataConfig", "FrozenConfig", "TaskMix", "config_error"), "config"),
    **dict.fromkeys(("BUILTIN_TEXT", "Corpus", "evaluate_perplexity", "load_corpus", "mean_nll", "read_documents",
                     "split_documents"), "corpus"),
    **dict.fromkeys(("TASK_KINDS", "Task", "encode_task", "heldout_task_set", "make_task", "pack_tasks",
                     "task_accuracy"), "tasks"),
    **dict.fromkeys(("EOS_TOKEN", "PAD_TOKEN", "Tokenizer", "byte_tokenizer", "train_bpe"), "tokenizer"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'phases.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DataConfig", "FrozenConfig", "TaskMix", "config_error",
    "BUILTIN_TEXT", "Corpus", "evaluate_perplexity", "load_corpus", "mean_nll", "read_documents", "split_documents",
    "TASK_KINDS", "Task", "encode_task", "heldout_task_set", "make_task", "pack_tasks", "task_accuracy",
    "EOS_TOKEN", "PAD_TOKEN", "Tokenizer", "byte_tokenizer", "train_bpe",
]
