"""Tiny Cognate models for the phase tests: one built from its config (2 layers, hidden 32), and
one saved as an HF model dir with the data tokenizer (the input of a training phase)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig

if TYPE_CHECKING:
    from phases.data import Corpus


def tiny_cognate(seed: int = 0, **kw) -> CognateForCausalLM:
    """Seeded weights; ``kw`` overrides config fields (e.g. ``memory_enabled``)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               memory_slots=16, memory_chunk_size=8)
    cfg.update(kw)
    return CognateForCausalLM(CognateModelConfig(**cfg)).eval()


def tiny_model_dir(corpus: Corpus, out_dir: Path) -> Path:
    """A seeded "memory"-variant Cognate model (d_model 32, 2 layers, d_ff 64) for ``corpus``'s
    tokenizer, written as an HF model dir with its tokenizer files. Returns ``out_dir``."""
    from phases.cognate import CognateConfig
    from phases.cognate.train import build_model_config, save_model_dir

    torch.manual_seed(0)
    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                        memory_slots=16, memory_chunk=8, max_seq_len=64)
    model = CognateForCausalLM(build_model_config(cfg, corpus.tokenizer, "memory"))
    return save_model_dir(model, corpus.tokenizer, out_dir)
