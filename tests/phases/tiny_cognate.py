"""A tiny Cognate model built from its config (2 layers, hidden 32), for the compression tests."""

from __future__ import annotations

import torch

from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig


def tiny_cognate(seed: int = 0, **kw) -> CognateForCausalLM:
    """Seeded weights; ``kw`` overrides config fields (e.g. ``memory_enabled``)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               memory_slots=16, memory_chunk_size=8)
    cfg.update(kw)
    return CognateForCausalLM(CognateModelConfig(**cfg)).eval()
