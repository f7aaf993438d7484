"""Phase 1 training: one seeded initialisation, a shared warm-up, then one specialisation per variant.

DESIGN.md ("The eight phases"): merging only means something for models in one basin, so
the three variants (reasoning / memory / adaptive, after the reference's TinyTitan) start from
one shared initialisation and warm-up (the *base* model that TIES/DARE/task arithmetic
subtract), then each continues with its ACT threshold, memory flag and data mix.

Determinism (DESIGN.md, "Determinism"): initialisation is seeded in a forked RNG; batches are
a pure function of (data seed, step) (``Corpus.batch``); the learning rate is a pure function
of the step; there is no dropout; ``torch.use_deterministic_algorithms(True)`` is on while
training on CPU. The caller fixes ``torch.set_num_threads`` (CPU kernels may sum in a
different order with another thread count). Checkpoints (model + AdamW state + per-step
records; safetensors + JSON, each written to a temp file and renamed) are taken every
``checkpoint_every`` steps; a restart resumes from the newest that verifies and ends with
bit-identical weights. Output directories are byte-deterministic HF model dirs (a test
compares their sha256 across processes). Checkpoints are ``phases.training``'s train states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coordinator.errors import ArtifactError, ConfigError, PhaseError
from phases.data import Corpus, TaskMix, Tokenizer, evaluate_perplexity, task_accuracy
from phases.training import (adamw, derived_seed, fingerprint, load_train_state, save_train_state,
                             training_context)
from serialization.checkpoint import publish_dir, sha256_file, staging_dir

from .config import CognateConfig
from .modeling import CognateForCausalLM, CognateModelConfig
from .sizing import count_params, pick_heads, solve_shape

__all__ = ["resolve_shape", "model_vocab_size", "build_model_config", "save_model_dir", "evaluate_model", "warmup",
           "specialize"]

LogFn = Callable[[dict, int], None]
ProgressFn = Callable[[int, int], None]
_WARMUP_TAG = 0x3A11  # data stream of the shared warm-up
_NOT_TRAINING = {"checkpoint_every", "eval_batches", "eval_tasks", "log_every", "loss_window"}


def resolve_shape(cfg: CognateConfig, vocab_size: int) -> tuple[dict[str, int], int]:
    """The model shape for this config and vocabulary, and its exact parameter count.

    Raises:
        ConfigError: key ``target_params`` when no shape is within 0.1% of the target.
    """
    common = dict(tie_embeddings=cfg.tie_embeddings, act_max_steps=cfg.act_max_steps_train,
                  memory_slots=cfg.memory_slots, memory_dim=cfg.memory_dim)
    if cfg.target_params is not None:
        return solve_shape(cfg.target_params, vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                           n_heads=cfg.n_heads, d_ff=cfg.d_ff, **common)
    d_ff = cfg.d_ff or max(1, round(cfg.ffn_mult * cfg.d_model))
    shape = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads or pick_heads(cfg.d_model),
             "d_ff": d_ff}
    return shape, count_params(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, d_ff=d_ff, **common)


def model_vocab_size(cfg: CognateConfig, tokenizer: Tokenizer) -> int:
    """Embedding rows: ``cfg.vocab_size`` or the tokenizer's vocabulary.

    Raises:
        ConfigError: key ``vocab_size`` when it is below the tokenizer's vocabulary.
    """
    if cfg.vocab_size is None:
        return tokenizer.vocab_size
    if cfg.vocab_size < tokenizer.vocab_size:
        msg = f"must be >= the tokenizer's vocabulary ({tokenizer.vocab_size}) or null, got {cfg.vocab_size}"
        raise ConfigError(f"vocab_size: {msg}", [("vocab_size", msg)])
    return cfg.vocab_size


def build_model_config(cfg: CognateConfig, tokenizer: Tokenizer, variant: str | None = None) -> CognateModelConfig:
    """The HF config of the base model (``variant=None``) or of one variant.

    Raises:
        ConfigError: unknown variant, a vocabulary below the tokenizer's, or an unreachable
            parameter target.
    """
    vocab = model_vocab_size(cfg, tokenizer)
    shape, _ = resolve_shape(cfg, vocab)
    v = cfg.variant(variant) if variant is not None else None
    return CognateModelConfig(
        vocab_size=vocab, hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        max_position_embeddings=cfg.max_seq_len, rotary_base=cfg.rotary_base, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, act_threshold=v.act_threshold if v else cfg.base_act_threshold,
        act_max_steps_train=cfg.act_max_steps_train, act_max_steps_infer=cfg.act_max_steps_infer,
        act_halt_bias=cfg.act_halt_bias, memory_enabled=v.memory_enabled if v else False,
        memory_slots=cfg.memory_slots, memory_dim=cfg.memory_dim, memory_chunk_size=cfg.memory_chunk,
        memory_max_lr=cfg.memory_max_lr, variant=variant or "base",
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def save_model_dir(model: CognateForCausalLM, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write an HF model dir (config.json, generation_config.json, model.safetensors, tokenizer
    files) atomically: into a sibling temp dir, fsync, then rename over ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    tmp = staging_dir(out_dir)
    model.save_pretrained(str(tmp))
    tokenizer.save(tmp, model_max_length=model.config.max_position_embeddings)
    return publish_dir(tmp, out_dir)


def _optimizer(model: torch.nn.Module, cfg: CognateConfig) -> torch.optim.AdamW:
    # ACT step embeddings are 2-D: they get weight decay like the matrices.
    return adamw(model, cfg.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))


def _lr_at(cfg: CognateConfig, step: int, total: int) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_ratio: a pure function of the step."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    progress = (step - cfg.lr_warmup_steps) / max(1, total - cfg.lr_warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _train(model, cfg: CognateConfig, corpus: Corpus, *, total: int, mix: TaskMix, seq_len: int, data_seed: int,
           work_dir: Path, fingerprint: str, stage: str, log: LogFn | None, progress: ProgressFn | None,
           device: torch.device) -> list[list[float]]:
    """Run (or resume) ``total`` steps. Returns per-step [cross-entropy, ponder cost, ponder steps]."""
    work_dir.mkdir(parents=True, exist_ok=True)
    opt = _optimizer(model, cfg)
    resumed = load_train_state(work_dir, model, opt, fingerprint, phase="cognate")
    start, records = resumed if resumed else (0, [])
    if progress is not None and start:
        progress(start, total)
    model.train()
    for step in range(start, total):
        lr = _lr_at(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = corpus.batch(step, cfg.batch_size, seq_len, data_seed, mix=mix).to(device)  # (B, T+1)
        out = model(input_ids=batch[:, :-1])
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = ce + cfg.ponder_cost * out.ponder_cost
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
        opt.step()
        done = step + 1
        records.append([ce.item(), out.ponder_cost.item(), out.ponder_steps.item()])
        if not math.isfinite(records[-1][0]):
            raise PhaseError("cognate", f"{stage}: the loss became {records[-1][0]} at step {done}; lower lr")
        if log is not None and (done % cfg.log_every == 0 or done == total):
            log({f"{stage}/loss": records[-1][0], f"{stage}/ponder_cost": records[-1][1],
                 f"{stage}/ponder_steps": records[-1][2], f"{stage}/lr": lr}, done)
        if done % cfg.checkpoint_every == 0 or done == total:
            save_train_state(work_dir, done, model, opt, records, fingerprint)
        if progress is not None:
            progress(done, total)
    return records


@torch.no_grad()
def evaluate_model(model: CognateForCausalLM, cfg: CognateConfig, corpus: Corpus) -> dict[str, float]:
    """Held-out perplexity, inference-time ponder steps and task exact-match (eval mode).

    Returns:
        ``training/perplexity``, ``eval/ponder_steps`` and ``tasks/accuracy[/kind]``.
    """
    ppl = evaluate_perplexity(model, corpus, batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    model.eval()
    device = next(model.parameters()).device
    windows = corpus.windows("heldout", max_windows=cfg.batch_size).to(device)
    ponder = float(model(input_ids=windows[:, :-1]).ponder_steps)
    tasks = corpus.heldout_subset(cfg.eval_tasks)
    out = {"training/perplexity": ppl, "eval/ponder_steps": ponder}
    out.update(task_accuracy(model, corpus.tokenizer, tasks, batch_size=64))
    return out


def _summary(records: list[list[float]], window: int) -> dict[str, float]:
    last, first = records[-window:], records[:window]
    mean = lambda rows, i: float(np.mean([r[i] for r in rows]))  # noqa: E731
    return {"training/loss": mean(last, 0), "training/loss_initial": mean(first, 0),
            "training/ponder_cost": mean(last, 1), "training/ponder_steps": mean(last, 2)}


def _check_context(cfg: CognateConfig, corpus: Corpus, seq_len: int) -> None:
    if seq_len > cfg.max_seq_len:
        msg = f"must be >= the training window ({seq_len} tokens), got {cfg.max_seq_len}"
        raise ConfigError(f"max_seq_len: {msg}", [("max_seq_len", msg)])


def warmup(cfg: CognateConfig, corpus: Corpus, *, seed: int, work_dir: Path, out_dir: Path,
           log: LogFn | None = None, progress: ProgressFn | None = None, device: str = "cpu") -> Path:
    """Seeded initialisation + shared warm-up for ``cfg.warmup_steps``; writes the base model.

    Args:
        cfg: Phase 1 config.  corpus: from ``phases.data.load_corpus``.  seed: run seed (>= 0).
        work_dir: checkpoints (resumed from when present).  out_dir: the HF model dir to write.
        log: optional ``log(metrics, step)``; gets ``warmup/*`` every ``log_every`` steps and
            the base model's evaluation at the end.  progress: optional ``progress(done, total)``.
        device: torch device for training (hashes are only comparable on the same device type).
    Returns:
        ``out_dir`` (config.json, generation_config.json, model.safetensors, tokenizer files).
    Raises:
        ConfigError, PhaseError (diverged loss, foreign checkpoint in work_dir).
    """
    dev = torch.device(device)
    _check_context(cfg, corpus, corpus.config.seq_len)
    hf_cfg = build_model_config(cfg, corpus.tokenizer)
    fp = fingerprint(stage="warmup", seed=seed, corpus=corpus.fingerprint, model=hf_cfg.to_dict(),
                      cfg=cfg.model_dump(mode="json", exclude=_NOT_TRAINING | {"steps", "variants"}))
    with training_context(dev):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CognateForCausalLM(hf_cfg)
        model.to(dev)
        records = _train(model, cfg, corpus, total=cfg.warmup_steps, mix=cfg.warmup_mix,
                         seq_len=corpus.config.seq_len, data_seed=derived_seed(seed, _WARMUP_TAG),
                         work_dir=Path(work_dir), fingerprint=fp, stage="warmup", log=log, progress=progress,
                         device=dev)
        model.to("cpu")
        save_model_dir(model, corpus.tokenizer, out_dir)
        if log is not None:
            # e.g. training/loss -> warmup/loss, eval/ponder_steps -> warmup/eval_ponder_steps,
            # tasks/accuracy/tool -> warmup/tasks_accuracy/tool
            metrics = {**_summary(records, cfg.loss_window), **evaluate_model(model, cfg, corpus)}
            rename = (("training/", ""), ("eval/", "eval_"), ("tasks/", "tasks_"))
            for old, new in rename:
                metrics = {k.replace(old, new, 1): v for k, v in metrics.items()}
            log({f"warmup/{k}": v for k, v in metrics.items()}, cfg.warmup_steps)
    return Path(out_dir)


def specialize(variant: str, base_dir: Path, cfg: CognateConfig, corpus: Corpus, *, seed: int, work_dir: Path,
               out_dir: Path, log: LogFn | None = None, progress: ProgressFn | None = None,
               device: str = "cpu") -> dict[str, float]:
    """Continue the base model as ``variant`` (its ACT threshold, memory flag, mix) for ``cfg.steps``.

    Args:
        variant: a key of ``cfg.variants``.  base_dir: the directory :func:`warmup` wrote.
        Others: as in :func:`warmup` (logged metrics are ``training/*``).
    Returns:
        Metrics computed from this run: ``model/total_params``, ``model/trainable_params``,
        ``model/act_threshold``, ``model/memory_enabled``, ``training/loss`` (mean
        cross-entropy of the last ``loss_window`` steps), ``training/loss_initial`` (first
        ``loss_window``), ``training/ponder_cost``/``ponder_steps`` (same window),
        ``training/perplexity`` (held out, eval mode), ``eval/ponder_steps`` (eval mode,
        infer cap), ``tasks/accuracy`` and per kind, ``training/steps``, ``training/tokens``.
    Raises:
        ConfigError: unknown variant or too long a window.  ArtifactError: base_dir lacks
        files.  PhaseError: base shape differs from the config, diverged loss, foreign checkpoint.
    """
    vcfg = cfg.variant(variant)
    base_dir, dev = Path(base_dir), torch.device(device)
    for name in ("config.json", "model.safetensors"):
        if not (base_dir / name).is_file():
            raise ArtifactError(str(base_dir / name), "missing: the base model directory is incomplete")
    seq_len = corpus.config.seq_len * vcfg.context_multiplier
    _check_context(cfg, corpus, seq_len)
    hf_cfg = build_model_config(cfg, corpus.tokenizer, variant)
    base_cfg = CognateModelConfig.from_pretrained(str(base_dir))
    shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "memory_slots", "memory_dim", "act_max_steps_train", "tie_word_embeddings")
    diff = [k for k in shape_keys if getattr(base_cfg, k, None) != getattr(hf_cfg, k)]
    if diff:
        raise PhaseError("cognate", f"base model {base_dir} differs from the config in {', '.join(diff)}")
    fp = fingerprint(stage=variant, seed=seed, corpus=corpus.fingerprint, model=hf_cfg.to_dict(),
                      base=sha256_file(base_dir / "model.safetensors"), variant=vcfg.model_dump(mode="json"),
                      cfg=cfg.model_dump(mode="json", exclude=_NOT_TRAINING | {"warmup_steps", "warmup_mix",
                                                                              "base_act_threshold", "variants"}))
    with training_context(dev):
        model = CognateForCausalLM.from_pretrained(str(base_dir), config=hf_cfg).to(dev)
        records = _train(model, cfg, corpus, total=cfg.steps, mix=vcfg.mix, seq_len=seq_len,
                         data_seed=derived_seed(seed, variant), work_dir=Path(work_dir), fingerprint=fp,
                         stage="training", log=log, progress=progress, device=dev)
        model.to("cpu")
        save_model_dir(model, corpus.tokenizer, out_dir)
        metrics = {"model/total_params": float(sum(p.numel() for p in model.parameters())),
                   "model/trainable_params": float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                   "model/act_threshold": vcfg.act_threshold, "model/memory_enabled": float(vcfg.memory_enabled),
                   "training/steps": float(cfg.steps), "training/tokens": float(cfg.steps * cfg.batch_size * seq_len)}
        metrics.update(_summary(records, cfg.loss_window))
        metrics.update(evaluate_model(model, cfg, corpus))
    if log is not None:
        log(metrics, cfg.steps)
    return metrics
