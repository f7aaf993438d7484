"""Phase 3 training: Quiet-STaR continued pre-training of an HF causal LM, resumable.

Determinism (DESIGN.md, "Determinism"): batches are a pure function of (data seed, step)
(``Corpus.batch``); each step's thought sampling uses a generator seeded from (run seed, step);
the learning rate is a pure function of the step; deterministic kernels are on while training.
Train-state checkpoints (model, mixing head, delimiter embeddings and AdamW state, with the
per-step records) are taken every ``checkpoint_every`` steps (``phases.training``); a restart
resumes from the newest that verifies and ends with bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coordinator.errors import PhaseError
from phases.data import Corpus
from phases.quietstar.config import QuietStarConfig
from phases.quietstar.evaluate import exact_match_accuracy, heldout_losses, sample_thought_rows, token_nll
from phases.quietstar.model import ThoughtModel, add_thought_tokens, save_thought_model
from phases.training import (adamw, derived_seed, fingerprint, load_causal_lm, load_train_state, save_train_state,
                             training_context)
from serialization.checkpoint import sha256_dir

__all__ = ["DATA_TAG", "RECORD_FIELDS", "lr_at", "make_optimizer", "train_quietstar"]

LogFn = Callable[[dict, int], None]
ProgressFn = Callable[[int, int], None]
DATA_TAG = 0x0357  # data stream of phase 3 (derived_seed(seed, DATA_TAG))
# Per-step record, in this order (checkpointed with the train state). Names follow the
# reference analysis' quietstar/* metrics where it has one.
RECORD_FIELDS = ("loss", "base_nll", "talk_nll", "policy_loss", "reward_mean", "thought_coherence_avg",
                 "thought_coherence_min", "thoughts_filtered", "mixing_weight_alpha", "reasoning_entropy",
                 "injection_points", "thought_length_avg")
_NOT_TRAINING = {"checkpoint_every", "log_every", "eval_batches", "eval_tasks", "sample_thoughts"}


def lr_at(cfg: QuietStarConfig, step: int) -> float:
    """Linear warm-up, then linear decay to 0 at the last step (the reference trains with the
    HF Trainer's default linear schedule): a pure function of the step."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.lr_warmup_steps))


def make_optimizer(model: torch.nn.Module, cfg: QuietStarConfig) -> torch.optim.AdamW:
    # The delimiter vectors are 1-D: no weight decay on them.
    return adamw(model, cfg.lr, cfg.weight_decay)


def _record(rollout: Any) -> list[float]:
    """The step's numbers, in RECORD_FIELDS order, from what the rollout computed."""
    keep, coherence = rollout.keep, rollout.scores["coherence"]
    kept = coherence[keep]
    parts = rollout.parts
    return [float(rollout.loss.detach()), float(parts["base_nll"]), float(parts["talk_nll"]),
            float(parts["policy_loss"]), float(parts["reward_mean"]),
            float(kept.mean()) if kept.numel() else float("nan"),
            float(kept.min()) if kept.numel() else float("nan"),
            100.0 * float((~keep).float().mean()),
            float(rollout.mixing_weight.mean()), float(rollout.talk_entropy.mean()),
            float(rollout.anchors.shape[1]), float(rollout.thoughts.shape[-1])]


def _load(model_dir: Path, cfg: QuietStarConfig, corpus: Corpus, seed: int) -> tuple[ThoughtModel, Any]:
    lm, tokenizer = load_causal_lm(model_dir, corpus.tokenizer.vocab_size, "quietstar")
    start_id, end_id = add_thought_tokens(lm, tokenizer, cfg)
    model = ThoughtModel(lm, cfg, start_id=start_id, end_id=end_id, init_seed=derived_seed(seed, "quietstar/init"))
    return model, tokenizer


def _average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Data parallelism: every worker's gradient becomes the mean over the workers (in the fixed
    parameter order, so all workers take the same optimizer step and stay identical). By hand,
    not DDP: DDP syncs inside ``forward``, and the thought rollout is ``ThoughtModel.loss``."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def _check_in_sync(model: torch.nn.Module, step: int) -> None:
    """Raise PhaseError unless every data-parallel worker holds the same weights (compared by
    two float64 checksums), so a silent divergence never reaches a checkpoint."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    sums = torch.stack([flat.sum(), flat.square().sum()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise PhaseError("quietstar", f"data-parallel workers hold different weights at step {step}")


def _combine_records(record: list[float], world_size: int) -> list[float]:
    """One step's record over all workers: means, except the minimum coherence (a minimum)."""
    import torch.distributed as dist

    values = torch.tensor(record, dtype=torch.float64)
    total, low = values.nan_to_num(0.0), values.nan_to_num(float("inf"))
    dist.all_reduce(total)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    out = (total / world_size).tolist()
    i = RECORD_FIELDS.index("thought_coherence_min")
    out[i] = float(low[i]) if math.isfinite(float(low[i])) else float("nan")
    return out


def train_quietstar(model_dir: Path, cfg: QuietStarConfig, corpus: Corpus, *, seed: int, work_dir: Path,
                    out_dir: Path, log: LogFn | None = None, progress: ProgressFn | None = None,
                    device: str = "cpu", rank: int = 0, world_size: int = 1) -> dict[str, Any] | None:
    """Train thoughts into the model in ``model_dir`` for ``cfg.steps``; write the thought model.

    Data-parallel with ``world_size`` > 1 (``torch.distributed`` initialised, e.g. by a Ray
    Train worker group): worker ``rank`` takes rows ``rank::world_size`` of every global batch
    and its own thought-sampling stream; gradients and step records are averaged over the
    workers. Worker 0 alone evaluates, logs, checkpoints and writes the model.

    Args:
        model_dir: an HF causal LM dir with tokenizer files (e.g. EvoMerge's output).
        cfg: the phase 3 config.  corpus: from ``phases.data.load_corpus``.  seed: run seed.
        work_dir: train-state checkpoints (resumed from when present).
        out_dir: the thought model dir to write (``save_thought_model``).
        log: optional ``log(metrics, step)``: ``quietstar/*`` every ``log_every`` steps.
        progress: optional ``progress(done, total)``.
        device: torch device (hashes are only comparable on the same device type).
        rank, world_size: this worker and the number of data-parallel workers.
    Returns:
        On worker 0, ``{"metrics": {...}, "samples": [sample thought rows]}`` (None on the
        others). Metrics: ``quietstar/*`` step records, means over the last ``log_every``
        steps; held-out ``quietstar/eval_loss_{input,base,thought}`` and ``..._hard`` (hardest
        10% of tokens by the input model's loss); ``quietstar/tasks_accuracy_{input,base,thought}``;
        ``quietstar/steps``, ``quietstar/tokens``.
    Raises:
        ArtifactError: model_dir is not an HF model dir.  PhaseError: the loss diverged, the
        vocabulary does not fit the data, or work_dir holds another run's checkpoint.
        ValueError: batch_size not divisible by world_size, or rank out of range.
    """
    if not 0 <= rank < world_size or cfg.batch_size % world_size:
        raise ValueError(f"need 0 <= rank < world_size and batch_size divisible by world_size; got rank {rank}, "
                         f"world_size {world_size}, batch_size {cfg.batch_size}")
    lead = rank == 0
    if not lead:
        log = progress = None
    model_dir, work_dir, dev = Path(model_dir), Path(work_dir), torch.device(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    seq_len = cfg.seq_len or corpus.config.seq_len
    if seq_len <= cfg.n_true:
        raise PhaseError("quietstar", f"seq_len {seq_len} must exceed n_true {cfg.n_true}")
    fp = fingerprint(stage="quietstar", seed=seed, corpus=corpus.fingerprint, model=sha256_dir(model_dir),
                     seq_len=seq_len, cfg=cfg.model_dump(mode="json", exclude=_NOT_TRAINING))
    with training_context(dev):
        model, tokenizer = _load(model_dir, cfg, corpus, seed)
        model.to(dev)
        windows = corpus.windows("heldout", seq_len, max_windows=cfg.eval_batches * cfg.batch_size)
        tasks = corpus.heldout_subset(cfg.eval_tasks)
        if lead:  # before training: the reference the trained model is compared with
            input_nll = token_nll(model.lm, windows, batch_size=cfg.batch_size)
            input_acc = exact_match_accuracy(model.lm, corpus.tokenizer, tasks) if tasks else None

        opt = make_optimizer(model, cfg)
        resumed = load_train_state(work_dir, model, opt, fp, phase="quietstar")
        start, records = resumed if resumed else (0, [])
        data_seed = derived_seed(seed, DATA_TAG)
        if progress is not None and start:
            progress(start, cfg.steps)
        model.train()
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = corpus.batch(step, cfg.batch_size, seq_len - 1, data_seed)[rank::world_size].to(dev)  # (B/W, L)
            stream = f"quietstar/sample/{step}" + (f"/{rank}" if world_size > 1 else "")
            gen = torch.Generator(device=dev).manual_seed(derived_seed(seed, stream))
            rollout = model.loss(batch, generator=gen)
            opt.zero_grad(set_to_none=True)
            rollout.loss.backward()
            if world_size > 1:
                _average_gradients(model, world_size)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
            opt.step()
            done = step + 1
            record = _record(rollout)
            records.append(_combine_records(record, world_size) if world_size > 1 else record)
            if not math.isfinite(records[-1][0]):
                raise PhaseError("quietstar", f"the loss became {records[-1][0]} at step {done}; lower lr")
            if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                log({**_window_means(records, cfg.log_every), "quietstar/lr": lr}, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                if world_size > 1:
                    _check_in_sync(model, done)
                if lead:
                    save_train_state(work_dir, done, model, opt, records, fp)
            if progress is not None:
                progress(done, cfg.steps)

        if not lead:
            return None
        model.eval()
        samples = _samples(model, corpus, seq_len, cfg, tokenizer)
        base_nll = token_nll(model.lm, windows, batch_size=cfg.batch_size)
        thought_nll = token_nll(model, windows, batch_size=cfg.batch_size)
        metrics = dict(_window_means(records, cfg.log_every))
        for name, nll in (("input", input_nll), ("base", base_nll), ("thought", thought_nll)):
            for key, value in heldout_losses(nll, input_nll).items():
                metrics[f"quietstar/eval_{key}_{name}"] = value
        if tasks:
            metrics["quietstar/tasks_accuracy_input"] = input_acc
            metrics["quietstar/tasks_accuracy_base"] = exact_match_accuracy(model.lm, corpus.tokenizer, tasks)
            metrics["quietstar/tasks_accuracy_thought"] = exact_match_accuracy(model, corpus.tokenizer, tasks)
        metrics["quietstar/steps"] = float(cfg.steps)
        metrics["quietstar/tokens"] = float(cfg.steps * cfg.batch_size * seq_len)
        model.to("cpu")
        save_thought_model(model, tokenizer, out_dir)
    return {"metrics": metrics, "samples": samples}


def _window_means(records: list[list[float]], window: int) -> dict[str, float]:
    """``quietstar/<field>``: the mean of the last ``window`` steps (NaN-skipping)."""
    rows = records[-window:]
    out = {}
    for i, name in enumerate(RECORD_FIELDS):
        vals = [r[i] for r in rows if math.isfinite(r[i])]
        out[f"quietstar/{name}"] = (min(vals) if name == "thought_coherence_min" else sum(vals) / len(vals)) \
            if vals else float("nan")
    return out


@torch.no_grad()
def _samples(model: ThoughtModel, corpus: Corpus, seq_len: int, cfg: QuietStarConfig, tokenizer: Any) -> list[dict]:
    """Sample thoughts on the first held-out window (seeded), to read in W&B and the report."""
    if cfg.sample_thoughts == 0:
        return []
    x = corpus.windows("heldout", seq_len, max_windows=1)[:, :seq_len].to(next(model.parameters()).device)
    rollout = model.loss(x, generator=torch.Generator(device=x.device).manual_seed(0))
    return sample_thought_rows(rollout, x, lambda ids: tokenizer.decode(ids), limit=cfg.sample_thoughts)
