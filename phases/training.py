"""What the phases that train a model share: deterministic kernels while training, resumable
train-state checkpoints (model + optimizer state + per-step records), fingerprints of what a
checkpoint was written for, and seeds derived from the run seed.

A checkpoint is ``ckpt-<step>.safetensors`` (tensors) + ``ckpt-<step>.json`` (step, fingerprint,
records, the tensors' sha256), both written atomically through ``serialization.checkpoint``; the
JSON is the commit point. Loading takes the newest that verifies, so a crash while writing
falls back to the previous one; the newest two are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.errors import ArtifactError, PhaseError
from serialization.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors

__all__ = ["training_context", "adamw", "load_causal_lm", "save_train_state", "load_train_state", "fingerprint",
           "derived_seed", "epoch_order"]


@contextlib.contextmanager
def training_context(device: torch.device):
    """Deterministic kernels on while training (restored after); HF progress bars off."""
    from transformers.utils import logging as hf_logging

    was_det, bars = torch.are_deterministic_algorithms_enabled(), hf_logging.is_progress_bar_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_det)
        if bars:
            hf_logging.enable_progress_bar()


def load_causal_lm(model_dir: Path, vocab_size: int, phase: str) -> tuple[torch.nn.Module, Any]:
    """The fp32 HF causal LM in ``model_dir`` (Cognate included) and its tokenizer, checked to hold
    the data tokenizer's ``vocab_size`` tokens.

    Raises:
        ArtifactError: ``model_dir`` has no config.json.  PhaseError: (naming ``phase``) the
            model's or its tokenizer's vocabulary is smaller than ``vocab_size``.
    """
    import phases.cognate.modeling  # noqa: F401 - registers the Cognate classes with the Auto API
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ArtifactError(str(model_dir / "config.json"), "missing: not an HF model directory")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if len(tokenizer) < vocab_size or model.get_input_embeddings().weight.shape[0] < vocab_size:
        raise PhaseError(phase, f"{model_dir}: the model's vocabulary ({len(tokenizer)} tokens) does not hold the "
                                f"data tokenizer's {vocab_size}")
    return model, tokenizer


def adamw(model: torch.nn.Module, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on the 2-D parameters (matrices, embeddings), none on
    norms, biases and other vectors. The fixed, module-ordered grouping keeps resumed optimizer
    state aligned with its parameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=betas, foreach=False)


def fingerprint(**parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys): what a checkpoint was written for."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def derived_seed(seed: int, tag: str | int) -> int:
    """A 32-bit seed for one stream (data, sampling, ...) of the run ``seed``, named by ``tag``."""
    code = tag if isinstance(tag, int) else int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "big")
    return int(np.random.SeedSequence([int(seed), code]).generate_state(1)[0])


def epoch_order(n: int, batch_size: int, seed: int, step: int, tag: str) -> list[int]:
    """Indices (into ``n`` examples) of step ``step``'s batch of ``batch_size``: a stream of per-epoch
    permutations seeded by ``derived_seed(seed, f"{tag}-{epoch}")``, a pure function of its
    arguments (a resumed or replayed step gets the same batch)."""
    perms: dict[int, list[int]] = {}
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(derived_seed(seed, f"{tag}-{epoch}"))
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out


def save_train_state(work_dir: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     records: list, fingerprint: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Checkpoint ``model``'s parameters, ``opt``'s per-parameter state, ``records`` and ``extra``
    tensors (other training state, e.g. a gradient filter's) at ``step``."""
    tensors = {f"extra/{k}": v.detach().clone() for k, v in (extra or {}).items()}
    for name, p in model.named_parameters():
        tensors[f"model/{name}"] = p.detach().clone()
        for key, value in opt.state.get(p, {}).items():  # absent for parameters never updated
            tensors[f"optim/{name}/{key}"] = value.detach().clone()
    stem = work_dir / f"ckpt-{step:08d}"
    sha = save_tensors(stem.with_suffix(".safetensors"), tensors)  # atomic, deterministic bytes
    meta = {"format": 1, "step": step, "fingerprint": fingerprint, "tensors": stem.name + ".safetensors",
            "sha256": sha, "records": records}
    atomic_write_json(stem.with_suffix(".json"), meta)  # the commit point: written last
    for old in sorted(work_dir.glob("ckpt-*.json"))[:-2]:  # keep the newest two
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink(missing_ok=True)


def load_train_state(work_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, fingerprint: str, *,
                     phase: str, extra: dict[str, torch.Tensor] | None = None) -> tuple[int, list] | None:
    """Restore the newest checkpoint in ``work_dir`` that verifies: ``(step, records)``, or None.
    ``extra``, when given, is filled with the ``extra`` tensors the checkpoint was saved with.

    Raises:
        PhaseError: the newest readable checkpoint was written for another fingerprint (another
            config, seed, corpus or input model): resuming it would mix two runs.
    """
    for path in sorted(work_dir.glob("ckpt-*.json"), reverse=True):
        try:
            meta = read_json(path)
        except ArtifactError as err:
            warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
            continue
        if meta.get("fingerprint") != fingerprint:
            raise PhaseError(phase, f"{path} was written for a different config, seed, corpus or input "
                                    "model; resume with the same inputs or use an empty work_dir")
        try:
            tensors = load_tensors(work_dir / meta["tensors"], expected_sha256=meta["sha256"])
        except ArtifactError as err:  # missing, torn or altered: fall back to the previous one
            warnings.warn(f"{err}; trying an older checkpoint", stacklevel=2)
            continue
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(tensors[f"model/{name}"])
                state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim/{name}/")}
                if state:
                    opt.state[p] = state
        if extra is not None:
            extra.update({k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")})
        return int(meta["step"]), list(meta["records"])
    return None
