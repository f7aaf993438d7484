"""What the agent teams (baking, compression) share: loading and saving models and the evaluation
corpus. Every file a task writes goes to a path named by the task (written atomically), so a task
replayed after a crash rewrites the same bytes.

Roles run one task at a time with one torch thread (``torch.set_num_threads(1)``): results are
then independent of the machine's core count, and nine agents do not oversubscribe a node.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["TOKENIZER_FILES", "corpus_for", "load_hf", "quality_of", "save_hf", "set_threads"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def set_threads() -> None:
    import torch  # here, not at import: the plain-data roles import this module and never load torch

    torch.set_num_threads(1)


def load_hf(path: str | Path) -> torch.nn.Module:
    """An HF model dir of the Cognate family, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import phases.cognate.modeling  # noqa: F401 - registers the Cognate family with the Auto classes

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def save_hf(model: torch.nn.Module, out_dir: str | Path, tokenizer_from: str | Path) -> Path:
    """Write ``model`` as an HF dir with the tokenizer files of ``tokenizer_from``, atomically."""
    from serialization.checkpoint import publish_dir, staging_dir

    out = Path(out_dir)
    tmp = staging_dir(out)
    model.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_from) / name
        if src.exists():
            shutil.copy2(src, tmp / name)
    return publish_dir(tmp, out)


@functools.lru_cache(maxsize=2)
def _corpus(data_json: str, seed: int):
    from phases.data import DataConfig, load_corpus

    return load_corpus(DataConfig.from_dict(json.loads(data_json)), seed=seed)


def corpus_for(payload: dict[str, Any]):
    """The run's corpus (``payload["data"]``, ``payload["seed"]``), loaded once per process."""
    return _corpus(json.dumps(payload["data"], sort_keys=True), int(payload["seed"]))


def quality_of(model: torch.nn.Module, payload: dict[str, Any], *, tasks: bool = False):
    """The validator's measurement of ``model`` on the fixed held-out data (``payload["eval"]``)."""
    from phases.compression.evaluate import measure_quality

    corpus = corpus_for(payload)
    ev = payload["eval"]
    chosen = list(corpus.heldout_tasks[: int(ev["tasks"])]) if tasks and int(ev["tasks"]) else None
    return measure_quality(model, corpus, batch_size=int(ev["batch_size"]), max_batches=int(ev["batches"]),
                           tasks=chosen)
