"""Phase 5: Forge training of an HF causal LM (a Cognate model, or phase 4's BitNet export, which
trains quantization-aware).

Every step, in order:

1. the curriculum gives the stage, the learning rate and whether Grokfast runs (``curriculum``);
2. the batch: in a dream cycle, rows replayed from the reservoir of earlier rows (``dream``);
   otherwise fresh text rows (the run's corpus, or the forge data files through the token cache,
   ``data``) and generated task rows at the edge-of-chaos controller's difficulty (``edge``),
   which are then offered to the reservoir;
3. forward; next-token cross-entropy, plus the self-model loss times its weight (``selfmodel``);
4. backward; the Grokfast filter in the stages that use it; gradient clipping; AdamW;
5. the controller counts the step's task successes (read off the same forward pass);
6. every ``eval_every`` steps the validation loss, and early stopping on it; every
   ``checkpoint_every`` steps a train-state checkpoint (model, self-model heads, AdamW state,
   Grokfast state, the reservoir, the controller, the early-stopping state and the best
   validation's weights). With ``restore_best`` the exported model is the best validation's.

A BitNet input (``config.bitnet`` lists its ternary layers) gets those layers back as
``BitLinear``, each with a sparsity threshold (its phase 4 threshold, else 0.5, under which the
exported ``codes * scale`` quantize to the same codes and scale, up to float rounding of the
scale, so the loaded model computes what phase 4 wrote), and is exported as phase 4 exports, so
phase 8 still stores it as ternary.

Determinism (DESIGN.md): batches, task rows, replay draws and the schedule are pure functions of
the run seed and the step; the controller and early stopping decide on what the model computed;
deterministic kernels are on. A restart resumes from the newest checkpoint that verifies and ends
with bit-identical weights. Throughput, memory, CPU and disk use are measured: they go to the
metrics and ``timings``, never into the model or the train state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coordinator.errors import PhaseError
from phases.bitnet.train import export_trained, load_trainable
from phases.data import TASK_KINDS, Corpus, TaskMix, mean_nll
from phases.data.tasks import pack_tasks, task_accuracy
from phases.forge.config import ForgeConfig
from phases.forge.curriculum import STAGES, stage_at
from phases.forge.dream import ReplayBuffer, in_dream
from phases.forge.edge import EdgeController, task_successes
from phases.forge.grokfast import make_filter
from phases.forge.selfmodel import SelfModel
from phases.training import (adamw, derived_seed, fingerprint, load_train_state, save_train_state,
                             training_context)
from serialization.checkpoint import sha256_dir

__all__ = ["RECORD_FIELDS", "train_forge"]

LogFn = Callable[[dict, int], None]
ProgressFn = Callable[[int, int], None]
# One row of the per-step records (the checkpoint keeps them; the report holds them all).
RECORD_FIELDS = ("loss", "accuracy", "gradient_norm", "self_model_loss", "stage", "learning_rate",
                 "grokfast_lambda", "dream_cycle", "difficulty_level", "tasks", "tasks_solved")
_NOT_TRAINING = {"eval_tasks", "log_every", "checkpoint_every"}
_TEXT_ONLY = TaskMix(text=1.0, arithmetic=0.0, modular=0.0, tool=0.0)
_MIB = 2.0 ** 20


class _Batches:
    """Fresh training batches: text rows, then task rows at a given difficulty, with answer spans."""

    def __init__(self, cfg: ForgeConfig, corpus: Corpus, cache: Any, seq_len: int, seed: int):
        self.cfg, self.corpus, self.cache, self.seq_len = cfg, corpus, cache, seq_len
        self.text_seed, self.task_seed = derived_seed(seed, "forge/text"), derived_seed(seed, "forge/tasks")
        self.n_tasks = round(cfg.data.task_fraction * cfg.batch_size)
        kinds = corpus.config.mix.row_probabilities()[1]
        self.kinds = kinds or {k: 1.0 / len(TASK_KINDS) for k in TASK_KINDS}

    def __call__(self, step: int, max_operand: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        n_text = self.cfg.batch_size - self.n_tasks
        rows, spans = [], []
        if n_text:
            rows.append(self.cache.batch(step, n_text, self.seq_len, self.text_seed, "train") if self.cache
                        else self.corpus.batch(step, n_text, self.seq_len, self.text_seed, mix=_TEXT_ONLY))
        for r in range(self.n_tasks):
            rng = np.random.default_rng(np.random.SeedSequence([self.task_seed, step, r]))
            row_spans: list[tuple[int, int]] = []
            ids = pack_tasks(rng, self.corpus.tokenizer, self.seq_len + 1, self.kinds, max_operand=max_operand,
                             max_modulus=self.corpus.config.max_modulus, exclude=self.corpus.heldout_prompts, spans=row_spans)
            rows.append(torch.tensor(ids, dtype=torch.long)[None])
            spans += [(n_text + r, s, e) for s, e in row_spans]
        return torch.cat(rows), spans


class _Usage:
    """Measured throughput, memory, CPU and disk use between two calls (psutil)."""

    def __init__(self, device: torch.device):
        import psutil

        self.device, self.proc = device, psutil.Process()
        self.proc.cpu_percent()  # starts the CPU-time window
        self.t, self.io = time.perf_counter(), self._io()
        self.t0, self.io0 = self.t, self.io

    def _io(self) -> int:
        try:
            c = self.proc.io_counters()
            return c.read_bytes + c.write_bytes
        except (AttributeError, OSError):  # not every platform counts per-process I/O
            return 0

    def _memory_mb(self) -> float:
        mem = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
               else self.proc.memory_info().rss)
        return mem / _MIB

    def sample(self, samples: int) -> dict[str, float]:
        now, io = time.perf_counter(), self._io()
        out = {"forge/training_throughput": samples / max(now - self.t, 1e-9),
               "forge/memory_usage_mb": self._memory_mb(), "forge/cpu_usage_percent": self.proc.cpu_percent(),
               "forge/disk_io_mb": (io - self.io) / _MIB}
        self.t, self.io = now, io
        return out

    def total(self, steps: int, batch_size: int) -> dict[str, float]:
        """Over the whole run in this process (``steps`` steps of ``batch_size`` rows)."""
        seconds = time.perf_counter() - self.t0
        return {"seconds": seconds, "steps": steps, "training_throughput": steps * batch_size / max(seconds, 1e-9),
                "disk_io_mb": (self._io() - self.io0) / _MIB,
                "memory_usage_mb": self._memory_mb()}


def _step_metrics(row: list[float], edge_rate: float | None, self_model: bool) -> dict[str, float]:
    skip = ("tasks", "tasks_solved") if self_model else ("tasks", "tasks_solved", "self_model_loss")
    out = {f"forge/{name}": value for name, value in zip(RECORD_FIELDS, row) if name not in skip}
    if edge_rate is not None:
        out["forge/edge_control_success_rate"] = edge_rate
    return out


def train_forge(model_dir: Path, cfg: ForgeConfig, corpus: Corpus, *, seed: int, work_dir: Path, out_dir: Path,
                log: LogFn | None = None, progress: ProgressFn | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train the HF causal LM in ``model_dir`` with phase 5's features (module docstring).

    Args:
        model_dir: an HF causal LM dir with tokenizer files (e.g. BitNet's export).
        cfg: the phase 5 config.  corpus: from ``phases.data.load_corpus``.  seed: run seed.
        work_dir: train-state checkpoints (resumed from when present) and the token cache.
        out_dir: the trained model's HF dir to write.
        log: optional ``log(metrics, step)``: the ``forge/*`` step metrics every step, usage
            every ``log_every`` steps, ``forge/val_loss`` at each validation.
        progress: optional ``progress(done, total)``.
        device: torch device for training (measurements run on CPU).
    Returns:
        ``{"metrics": {forge/*}, "report": {...}, "timings": {...}}``; ``report`` is a function
        of the inputs (an artifact), ``timings`` holds what was measured by the clock.
    Raises:
        ArtifactError: model_dir is not an HF model dir.  ConfigError: unreadable data files.
        PhaseError: the loss diverged, the model cannot be trained as configured, or work_dir
            holds another run's checkpoint.
    """
    model_dir, work_dir, dev = Path(model_dir), Path(work_dir), torch.device(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    seq_len = cfg.seq_len or corpus.config.seq_len
    cache = None
    if cfg.data.files:
        from phases.forge.data import build_token_cache

        cache = build_token_cache(cfg.data.files, corpus.tokenizer, work_dir / "data",
                                  text_field=cfg.data.text_field, validation_fraction=cfg.data.validation_fraction,
                                  quality=cfg.data.quality)
    fp = fingerprint(stage="forge", seed=seed, corpus=corpus.fingerprint, model=sha256_dir(model_dir),
                     data=cache.fingerprint if cache else None, seq_len=seq_len,
                     cfg=cfg.model_dump(mode="json", exclude=_NOT_TRAINING))
    val_windows = (cache.windows("valid", seq_len, cfg.eval_batches * cfg.batch_size) if cache
                   else corpus.windows("heldout", seq_len, cfg.eval_batches * cfg.batch_size))
    tasks = corpus.heldout_subset(cfg.eval_tasks)
    batches = _Batches(cfg, corpus, cache, seq_len, seed)
    with training_context(dev):
        model, tokenizer, bitnet = load_trainable(model_dir, corpus.tokenizer.vocab_size, "forge")
        input_val = mean_nll(model, val_windows, batch_size=cfg.batch_size)
        input_tasks = task_accuracy(model, corpus.tokenizer, tasks)["tasks/accuracy"] if tasks else None
        model.to(dev)
        parts = nn.ModuleDict({"model": model})
        self_model = None
        if cfg.self_model.enabled:
            try:
                with torch.random.fork_rng(devices=[]):  # the heads' initialisation: seeded
                    torch.manual_seed(derived_seed(seed, "forge/self_model"))
                    self_model = parts["self_model"] = SelfModel(model, cfg.self_model.taps).to(dev)
            except ValueError as err:
                raise PhaseError("forge", f"self-modeling: {err}; set forge.self_model.enabled: false") from None
        opt = adamw(parts, cfg.lr, cfg.weight_decay)
        grokfast = make_filter(cfg.grokfast)
        edge = EdgeController(cfg.edge)
        buffer = ReplayBuffer(cfg.dream.buffer_size, derived_seed(seed, "forge/dream"))
        # best val loss, validations without improvement, best step, stopped early (0/1)
        early = torch.tensor([math.inf, 0.0, 0.0, 0.0], dtype=torch.float64)
        evals = torch.zeros(0, 2, dtype=torch.float64)  # (step, val loss) per validation
        extra: dict[str, torch.Tensor] = {}
        resumed = load_train_state(work_dir, parts, opt, fp, phase="forge", extra=extra)
        start, records = resumed if resumed else (0, [])
        best: dict[str, torch.Tensor] = {}  # the model's weights at the best validation (restore_best)
        if resumed:
            def sub(prefix: str) -> dict[str, torch.Tensor]:
                return {k.removeprefix(prefix): v for k, v in extra.items() if k.startswith(prefix)}
            if grokfast is not None:
                grokfast.load_state_dict(sub("grokfast/"))
            edge.load_state_dict(sub("edge/"))
            buffer.load_state_dict(sub("dream/"))
            early, evals, best = extra["early"].clone(), extra["evals"].clone(), sub("best/")
        if progress is not None and start:
            progress(start, cfg.steps)
        usage = _Usage(dev)
        model.train()
        step = sampled = start
        while step < cfg.steps and not early[3]:
            stage = stage_at(cfg.curriculum, step, cfg.steps)
            lr = cfg.lr * stage.lr_scale
            for group in opt.param_groups:
                group["lr"] = lr
            dreaming = cfg.dream.enabled and in_dream(step, cfg.dream.every, cfg.dream.steps) and len(buffer) > 0
            if dreaming:
                batch, spans = buffer.sample(cfg.batch_size, step), []
            else:
                operand = edge.max_operand if cfg.edge.enabled else corpus.config.max_operand
                batch, spans = batches(step, operand)
                if cfg.dream.enabled:
                    buffer.add(batch, step)
            batch = batch.to(dev)
            logits = model(input_ids=batch[:, :-1]).logits  # (B, L, V)
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits.transpose(1, 2), targets)
            sm_loss = self_model.loss() if self_model is not None else None
            total = loss if sm_loss is None else loss + cfg.self_model.weight * sm_loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            use_filter = grokfast is not None and stage.grokfast
            if use_filter:
                grokfast.apply(parts)
            norm = torch.nn.utils.clip_grad_norm_(parts.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                                  float("inf"), foreach=False)
            opt.step()
            solved = task_successes(logits, targets, spans)
            level = edge.level
            if cfg.edge.enabled:
                edge.update(solved, step)
            step += 1
            row = [float(loss.detach()), float((logits.detach().argmax(-1) == targets).float().mean()), float(norm),
                   float(sm_loss.detach()) if sm_loss is not None else 0.0, stage.index, lr,
                   cfg.grokfast.amplification if use_filter else 0.0, float(dreaming), level, len(solved), sum(solved)]
            records.append(row)
            if not math.isfinite(row[0]):
                raise PhaseError("forge", f"the loss became {row[0]} at step {step}; lower forge.lr")
            metrics = _step_metrics(row, edge.rate if cfg.edge.enabled else None, self_model is not None)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = mean_nll(model, val_windows, batch_size=cfg.batch_size)
                evals = torch.cat([evals, torch.tensor([[step, val]], dtype=torch.float64)])
                if val < early[0] - cfg.min_delta:
                    early[0], early[1], early[2] = val, 0, step
                    if cfg.restore_best:
                        best = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
                else:
                    early[1] += 1
                    early[3] = float(cfg.patience > 0 and early[1] >= cfg.patience)
                metrics.update({"forge/val_loss": val, "forge/val_perplexity": math.exp(min(val, 50.0))})
            if log is not None:
                if step % cfg.log_every == 0 or step == cfg.steps:
                    metrics.update(usage.sample((step - sampled) * cfg.batch_size))
                    sampled = step
                log(metrics, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or early[3]:
                state = {"early": early, "evals": evals, **{f"best/{n}": v for n, v in best.items()}}
                for prefix, part in (("grokfast/", grokfast), ("edge/", edge), ("dream/", buffer)):
                    if part is not None:
                        state.update({prefix + k: v for k, v in part.state_dict().items()})
                save_train_state(work_dir, step, parts, opt, records, fp, extra=state)
            if progress is not None:
                progress(step, cfg.steps)
        timings = usage.total(step - start, cfg.batch_size)
        if self_model is not None:
            self_model.remove()
        model.eval().to("cpu")
        if best and int(early[2]) != step:  # the best validation was not the last step's
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(best[n])
        final_val = mean_nll(model, val_windows, batch_size=cfg.batch_size)
        final_tasks = task_accuracy(model, corpus.tokenizer, tasks)["tasks/accuracy"] if tasks else None
        export_trained(model, tokenizer, out_dir, bitnet)
    return _summary(cfg, records, evals, early, edge, buffer, input_val, final_val, input_tasks, final_tasks,
                    cache, bitnet is not None, timings)


def _summary(cfg: ForgeConfig, records: list, evals: torch.Tensor, early: torch.Tensor, edge: EdgeController,
             buffer: ReplayBuffer, input_val: float, final_val: float, input_tasks: float | None,
             final_tasks: float | None, cache: Any, quantized: bool, timings: dict[str, float]) -> dict[str, Any]:
    steps = len(records)
    window = records[-cfg.log_every:]
    col = {name: i for i, name in enumerate(RECORD_FIELDS)}
    dream_steps = [r[col["dream_cycle"]] for r in records]
    cycles = sum(1 for i, d in enumerate(dream_steps) if d and (i == 0 or not dream_steps[i - 1]))
    scored = sum(r[col["tasks"]] for r in records)
    metrics = {
        "forge/training_steps": steps,
        "forge/final_loss": sum(r[0] for r in window) / max(len(window), 1),
        "forge/final_accuracy": sum(r[1] for r in window) / max(len(window), 1),
        "forge/val_loss": final_val,
        "forge/val_perplexity": math.exp(min(final_val, 50.0)),
        "forge/val_loss_input": input_val,
        "forge/best_val_loss": float(early[0]),
        "forge/best_step": int(early[2]),
        "forge/early_stopped": int(early[3]),
        "forge/dream_cycles": cycles,
        "forge/dream_steps": int(sum(dream_steps)),
        "forge/difficulty_level": edge.level,
        "forge/max_operand": edge.max_operand if cfg.edge.enabled else None,
        "forge/train_task_success": sum(r[col["tasks_solved"]] for r in records) / scored if scored else None,
        "forge/quantization_aware": int(quantized),
    }
    if cfg.grokfast.enabled:
        metrics["forge/grokfast_lambda"] = cfg.grokfast.amplification
        if cfg.grokfast.filter == "ema":
            metrics["forge/grokfast_ema_alpha"] = cfg.grokfast.alpha
    if final_tasks is not None:
        metrics["forge/task_accuracy"] = final_tasks
        metrics["forge/task_accuracy_input"] = input_tasks
    metrics = {k: v for k, v in metrics.items() if v is not None}
    stages = {}
    for i, r in enumerate(records):
        stages.setdefault(STAGES[int(r[col["stage"]])], [i + 1, i + 1])[1] = i + 1
    report = {"steps": steps, "records": {"fields": list(RECORD_FIELDS), "rows": records},
              "validations": evals.tolist(), "stages": stages, "replay_buffer_rows_seen": buffer.seen,
              "input": {"val_loss": input_val, "task_accuracy": input_tasks},
              "output": {"val_loss": final_val, "task_accuracy": final_tasks},
              "data": cache.stats if cache is not None else "corpus"}
    metrics["forge/training_throughput"] = timings["training_throughput"]
    return {"metrics": metrics, "report": report, "timings": timings}
