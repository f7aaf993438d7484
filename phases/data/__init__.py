"""Shared data layer of the phases: offline corpus, tokenizers, generated tasks, evaluation.

No data set is downloaded at run time (DESIGN.md, "Data"): the builtin corpus is Python
documentation prose shipped in ``text/`` (PSF license, see ``text/NOTICE.txt``); tasks are
generated with known answers; tokenizers are byte-level or BPE trained offline.
"""

from .config import DataConfig, FrozenConfig, TaskMix, config_error
from .corpus import BUILTIN_TEXT, Corpus, evaluate_perplexity, load_corpus, read_documents, split_documents
from .tasks import TASK_KINDS, Task, encode_task, heldout_task_set, make_task, pack_tasks, task_accuracy
from .tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, byte_tokenizer, train_bpe

__all__ = [
    "DataConfig", "FrozenConfig", "TaskMix", "config_error",
    "BUILTIN_TEXT", "Corpus", "evaluate_perplexity", "load_corpus", "read_documents", "split_documents",
    "TASK_KINDS", "Task", "encode_task", "heldout_task_set", "make_task", "pack_tasks", "task_accuracy",
    "EOS_TOKEN", "PAD_TOKEN", "Tokenizer", "byte_tokenizer", "train_bpe",
]
