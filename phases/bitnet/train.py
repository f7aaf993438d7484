"""Phase 4: calibrate, quantize, fine-tune (QAT) and store an HF causal LM as BitNet b1.58.

The steps, in order:

1. measure the input model: held-out token accuracy, perplexity and task accuracy
   (``phases.compression.evaluate.measure_quality``); latency and memory on a fixed batch
   (``phases.compression.profile.profile_model``);
2. calibrate on ``calibration_samples`` training windows (``calibrate.collect``); choose
   per-layer sparsity thresholds when the config enables them; add SubLN to Cognate models
   with gains from the calibration;
3. replace every Linear but ``keep`` by ``BitLinear`` and measure the quality again (quantized,
   before QAT: what QAT has to recover);
4. QAT: AdamW on next-token cross-entropy through the STE, optionally with the Grokfast EMA
   filter, resumable from train-state checkpoints;
5. write the packed model (``packed.save_packed``: ternary codes at 2 or 1.6 bits per weight,
   their scales, the other tensors in full precision) and the HF export (the same model with
   the ternary weights as float ``codes * scale``, loadable by ``from_pretrained``; phase 8
   recognises them as ternary and stores them losslessly with its ternary codec);
6. reload the packed model and measure it: its quality, latency, memory, and its bytes on disk.

Determinism (DESIGN.md): calibration windows, QAT batches and the profiled batch are pure
functions of the run seed; the learning rate a pure function of the step; deterministic kernels
are on while training. A restart resumes from the newest checkpoint that verifies (model, AdamW
state and the Grokfast EMA) and ends with bit-identical weights. Latency and memory are
measured, so they vary from run to run: they go to the metrics and ``timings``, never into the
model files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from coordinator.errors import PhaseError
from phases.bitnet.calibrate import add_sub_norm, choose_thresholds, collect, target_layers
from phases.bitnet.config import BitNetConfig
from phases.bitnet.packed import PACKED_FILE, PackedBitLinear, load_packed, save_packed
from phases.bitnet.quant import BitLinear, replace_linears
from phases.data import Corpus
from phases.forge.grokfast import make_filter
from phases.training import (adamw, derived_seed, fingerprint, load_causal_lm, load_train_state, save_train_state,
                             training_context)
from serialization.checkpoint import sha256_dir

__all__ = ["DATA_TAG", "RECORD_FIELDS", "export_hf", "export_trained", "load_trainable", "lr_at", "train_bitnet"]

LogFn = Callable[[dict, int], None]
ProgressFn = Callable[[int, int], None]
DATA_TAG = 0x0B17  # data stream of phase 4's QAT (derived_seed(seed, DATA_TAG))
RECORD_FIELDS = ("qat_loss", "grad_norm")
_NOT_TRAINING = {"checkpoint_every", "log_every", "eval_batches", "eval_tasks", "profile_batch", "profile_seq_len",
                 "profile_repeats", "packing", "kernel"}
_MIB = 2.0 ** 20


def lr_at(cfg: BitNetConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step: a pure function of the step."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    span = max(1, cfg.steps - cfg.lr_warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.lr_warmup_steps) / span)))


def _load(model_dir: Path, corpus: Corpus) -> tuple[torch.nn.Module, Any]:
    model, tokenizer = load_causal_lm(model_dir, corpus.tokenizer.vocab_size, "bitnet")
    if getattr(model.config, "bitnet", None):
        raise PhaseError("bitnet", f"{model_dir} is already a BitNet model (phase 4's output)")
    return model, tokenizer


def _quality(model: torch.nn.Module, corpus: Corpus, cfg: BitNetConfig, tasks: list) -> dict[str, Any]:
    from phases.compression.evaluate import measure_quality

    return measure_quality(model, corpus, batch_size=cfg.batch_size, max_batches=cfg.eval_batches,
                           tasks=tasks).to_json()


def _profile(model: torch.nn.Module, ids: torch.Tensor, cfg: BitNetConfig) -> dict[str, Any]:
    """Latency and memory of the fixed batch; ``total_memory_bytes`` = weights + the forward's peak."""
    from phases.compression.profile import profile_model

    p = profile_model(model, ids, repeats=cfg.profile_repeats).to_json()
    p["total_memory_bytes"] = p["parameter_bytes"] + p["peak_memory_bytes"]
    return p


def _layer_table(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per ternary layer: shape, threshold, sparsity and the mean |latent - quantized| weight."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            w = m.weight.detach().float()
            q = m.quantized_weight().float()
            out[name] = {"shape": list(w.shape), "threshold": m.threshold,
                         "zeros": int((q == 0).sum()), "weights": w.numel(),
                         "abs_error_sum": float((w - q).abs().sum(dtype=torch.float64)),
                         "abs_weight_sum": float(w.abs().sum(dtype=torch.float64))}
    return out


def export_hf(model: torch.nn.Module, tokenizer: Any, out_dir: Path, info: dict[str, Any]) -> None:
    """The model as a plain HF dir: ternary layers as ``nn.Linear`` holding ``codes * scale``."""
    from serialization.checkpoint import publish_dir, staging_dir

    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            state[f"{name}.weight"] = m.quantized_weight()
    config = type(model.config).from_dict(model.config.to_dict())
    config.bitnet = info  # marks the model as phase 4's output, says which layers are ternary
    torch.manual_seed(0)  # the constructor's random init is overwritten below; seeded anyway
    plain = type(model)(config)
    plain.load_state_dict(state, strict=True)
    tmp = staging_dir(out_dir)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    publish_dir(tmp, out_dir)


def load_trainable(model_dir: Path, vocab_size: int, phase: str) -> tuple[torch.nn.Module, Any, dict | None]:
    """The model in ``model_dir`` ready for further training, its tokenizer and its BitNet info
    (None for a full-precision model). A BitNet model (``config.bitnet`` lists its ternary layers,
    as :func:`export_hf` writes) gets those layers back as ``BitLinear`` (quantization-aware
    training), each with its phase 4 sparsity threshold, else 0.5: under it the exported
    ``codes * scale`` quantize to the same codes and scale (up to float rounding of the scale), so
    the loaded model computes what was written. Phases 5 and 6 train through this.

    Raises:
        ArtifactError: not an HF model dir.  PhaseError: (naming ``phase``) the vocabulary is too
            small, or ``config.bitnet`` lists layers the model lacks.
    """
    model, tokenizer = load_causal_lm(model_dir, vocab_size, phase)
    info = getattr(model.config, "bitnet", None)
    if info:
        layers = set(info["layers"])
        linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        missing = layers - set(linears)
        if missing:
            raise PhaseError(phase, f"{model_dir}: config.bitnet lists layers the model lacks: {sorted(missing)}")
        thresholds = {n: (info.get("thresholds") or {}).get(n) or 0.5 for n in layers}
        replace_linears(model, keep=[n for n in linears if n not in layers], thresholds=thresholds)
        info = {**info, "thresholds": thresholds}
    return model, tokenizer, info


def export_trained(model: torch.nn.Module, tokenizer: Any, out_dir: Path, bitnet: dict | None) -> None:
    """Write a model loaded with :func:`load_trainable` as an HF dir: a BitNet model as
    :func:`export_hf` writes it (so phase 8 still stores it as ternary), else as it is."""
    if bitnet is not None:
        export_hf(model, tokenizer, out_dir, bitnet)
        return
    from serialization.checkpoint import publish_dir, staging_dir

    tmp = staging_dir(out_dir)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    publish_dir(tmp, out_dir)


def train_bitnet(model_dir: Path, cfg: BitNetConfig, corpus: Corpus, *, seed: int, work_dir: Path, out_dir: Path,
                 packed_dir: Path, log: LogFn | None = None, progress: ProgressFn | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Turn the HF causal LM in ``model_dir`` into BitNet b1.58 (module docstring).

    Args:
        model_dir: an HF causal LM dir with tokenizer files (e.g. Quiet-STaR's output).
        cfg: the phase 4 config.  corpus: from ``phases.data.load_corpus``.  seed: run seed.
        work_dir: train-state checkpoints (resumed from when present).
        out_dir: the HF export to write.  packed_dir: the packed model dir to write.
        log: optional ``log(metrics, step)``: ``bitnet/qat_loss``, ``bitnet/grad_norm``,
            ``bitnet/lr`` every ``log_every`` steps.
        progress: optional ``progress(done, total)``.
        device: torch device for calibration and QAT (measurements run on CPU).
    Returns:
        ``{"metrics": {bitnet/*}, "report": {...}, "calibration": {...}, "timings": {...}}``:
        ``report`` and ``calibration`` are functions of the inputs (artifacts); ``timings``
        holds the measured latencies and memory.
    Raises:
        ArtifactError: model_dir is not an HF model dir.  PhaseError: the model cannot be
        quantized as configured, the loss diverged, or work_dir holds another run's checkpoint.
    """
    model_dir, work_dir, dev = Path(model_dir), Path(work_dir), torch.device(device)
    work_dir.mkdir(parents=True, exist_ok=True)
    seq_len = cfg.seq_len or corpus.config.seq_len
    fp = fingerprint(stage="bitnet", seed=seed, corpus=corpus.fingerprint, model=sha256_dir(model_dir),
                     seq_len=seq_len, cfg=cfg.model_dump(mode="json", exclude=_NOT_TRAINING))
    tasks = corpus.heldout_subset(cfg.eval_tasks)
    gen = torch.Generator().manual_seed(derived_seed(seed, "bitnet/profile"))
    profile_ids = torch.randint(0, corpus.tokenizer.vocab_size, (cfg.profile_batch, cfg.profile_seq_len),
                                generator=gen)
    with training_context(dev):
        model, tokenizer = _load(model_dir, corpus)
        input_quality = _quality(model, corpus, cfg, tasks)
        input_profile = _profile(model, profile_ids, cfg)
        input_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        model.to(dev)

        # -- calibration ---------------------------------------------------------------------
        layers = target_layers(model, cfg.keep)
        if not layers:
            raise PhaseError("bitnet", f"no Linear layer to quantize (bitnet.keep = {list(cfg.keep)})")
        cal_seed = derived_seed(seed, "bitnet/calibration")
        windows = torch.cat([corpus.batch(i, cfg.batch_size, seq_len - 1, cal_seed)
                             for i in range(math.ceil(cfg.calibration_samples / cfg.batch_size))])
        windows = windows[:cfg.calibration_samples]
        stats = collect(model, layers, windows, batch_size=cfg.batch_size,
                        rows=cfg.calibration_rows if cfg.sparsity_thresholds else 0)
        thresholds, threshold_errors = ({}, {})
        if cfg.sparsity_thresholds:
            thresholds, threshold_errors = choose_thresholds(model, stats, cfg.threshold_grid)
        if cfg.sub_norm:
            model = add_sub_norm(model, stats)
        replace_linears(model, keep=cfg.keep, thresholds=thresholds)
        quantized_quality = _quality(model, corpus, cfg, tasks)

        # -- QAT -----------------------------------------------------------------------------
        opt = adamw(model, cfg.lr, cfg.weight_decay)
        grokfast = make_filter(cfg.grokfast)
        extra: dict[str, torch.Tensor] = {}
        resumed = load_train_state(work_dir, model, opt, fp, phase="bitnet", extra=extra)
        start, records = resumed if resumed else (0, [])
        if grokfast is not None:
            grokfast.load_state_dict({k.removeprefix("grokfast/"): v for k, v in extra.items()})
        if progress is not None and start:
            progress(start, cfg.steps)
        data_seed = derived_seed(seed, DATA_TAG)
        model.train()
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = corpus.batch(step, cfg.batch_size, seq_len - 1, data_seed).to(dev)  # (B, L)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grokfast is not None:
                grokfast.apply(model)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                                  float("inf"), foreach=False)
            opt.step()
            done = step + 1
            records.append([float(loss.detach()), float(norm)])
            if not math.isfinite(records[-1][0]):
                raise PhaseError("bitnet", f"the QAT loss became {records[-1][0]} at step {done}; lower bitnet.lr")
            if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                log({**_window_means(records, cfg.log_every), "bitnet/lr": lr}, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                state = {f"grokfast/{k}": v for k, v in grokfast.state_dict().items()} if grokfast else None
                save_train_state(work_dir, done, model, opt, records, fp, extra=state)
            if progress is not None:
                progress(done, cfg.steps)
        model.eval().to("cpu")
        qat_quality = _quality(model, corpus, cfg, tasks)
        table = _layer_table(model)
        with torch.no_grad():
            qat_logits = model(input_ids=profile_ids).logits

    # -- storage and the packed model's measurements --------------------------------------------
    info = {"layers": sorted(table), "packing": cfg.packing, "thresholds": thresholds, "activation_bits": 8,
            "sub_norm": cfg.sub_norm}
    export_hf(model, tokenizer, out_dir, info)
    save_packed(model, packed_dir, cfg.packing, tokenizer)
    packed = load_packed(packed_dir, kernel=cfg.kernel)
    packed_layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    packed_quality = _quality(packed, corpus, cfg, tasks)
    with torch.no_grad():
        parity = float((packed(input_ids=profile_ids).logits - qat_logits).abs().max())
    packed_profile = _profile(packed, profile_ids, cfg)

    ternary_weights = sum(m.out_features * m.in_features for m in packed_layers)
    ternary_bytes = sum(m.packed.numel() + 4 for m in packed_layers)  # codes + one float32 scale each
    params = sum(p.numel() for p in packed.parameters()) + ternary_weights
    packed_bytes = (packed_dir / PACKED_FILE).stat().st_size
    zeros = sum(r["zeros"] for r in table.values())
    metrics = {
        "bitnet/compression_ratio": input_bytes / packed_bytes,
        "bitnet/input_bytes": input_bytes,
        "bitnet/packed_bytes": packed_bytes,
        "bitnet/ternary_bits_per_weight": 8 * ternary_bytes / ternary_weights,
        "bitnet/ternary_layer_ratio": 32 * ternary_weights / (8 * ternary_bytes),
        "bitnet/ternary_share": ternary_weights / params,
        "bitnet/ternary_layers": len(packed_layers),
        "bitnet/sparsity_ratio": zeros / ternary_weights,
        "bitnet/quantization_error": sum(r["abs_error_sum"] for r in table.values()) / ternary_weights,
        "bitnet/quantization_error_relative": sum(r["abs_error_sum"] for r in table.values())
        / max(sum(r["abs_weight_sum"] for r in table.values()), 1e-30),
        "bitnet/calibration_samples": int(windows.shape[0]),
        "bitnet/steps": cfg.steps,
        "bitnet/perplexity": packed_quality["perplexity"],
        "bitnet/perplexity_input": input_quality["perplexity"],
        "bitnet/perplexity_before_qat": quantized_quality["perplexity"],
        "bitnet/token_accuracy": packed_quality["token_accuracy"],
        "bitnet/token_accuracy_input": input_quality["token_accuracy"],
        "bitnet/accuracy_retention": packed_quality["token_accuracy"] / input_quality["token_accuracy"],
        "bitnet/accuracy_retention_before_qat": quantized_quality["token_accuracy"] / input_quality["token_accuracy"],
        # the packed model (reloaded from disk) against the QAT model it was written from
        "bitnet/packed_max_abs_logit_diff": parity,
    }
    if tasks:
        metrics["bitnet/task_accuracy"] = packed_quality["task_accuracy"]
        metrics["bitnet/task_accuracy_input"] = input_quality["task_accuracy"]
        if input_quality["task_accuracy"]:
            metrics["bitnet/task_accuracy_retention"] = packed_quality["task_accuracy"] / input_quality["task_accuracy"]
    if records:
        metrics.update(_window_means(records, cfg.log_every))
    timings = {"input": input_profile, "packed": packed_profile}
    metrics.update({
        "bitnet/speed/latency_p50_ms": packed_profile["latency_ms_p50"],
        "bitnet/speed/latency_p95_ms": packed_profile["latency_ms_p95"],
        "bitnet/speed/throughput_fps": cfg.profile_batch * 1e3 / packed_profile["latency_ms_mean"],
        "bitnet/inference_speedup": input_profile["latency_ms_p50"] / packed_profile["latency_ms_p50"],
        "bitnet/memory/peak_mb": packed_profile["total_memory_bytes"] / _MIB,
        "bitnet/memory/allocated_mb": packed_profile["parameter_bytes"] / _MIB,
        "bitnet/memory_reduction": input_profile["total_memory_bytes"] / packed_profile["total_memory_bytes"],
    })
    report = {"input": {"quality": input_quality, "bytes": input_bytes, "dir": str(model_dir)},
              "quantized_before_qat": {"quality": quantized_quality},
              "qat": {"quality": qat_quality, "steps": cfg.steps, "records": records},
              "packed": {"quality": packed_quality, "bytes": packed_bytes, "format": cfg.packing},
              "layers": table, "thresholds": thresholds}
    calibration = {"samples": int(windows.shape[0]), "seq_len": seq_len,
                   "layers": {n: s.to_json() for n, s in stats.items()},
                   "threshold_errors": threshold_errors, "thresholds": thresholds}
    return {"metrics": metrics, "report": report, "calibration": calibration, "timings": timings}


def _window_means(records: list[list[float]], window: int) -> dict[str, float]:
    """``bitnet/<field>``: the mean of the last ``window`` steps."""
    rows = records[-window:]
    return {f"bitnet/{name}": sum(r[i] for r in rows) / len(rows) for i, name in enumerate(RECORD_FIELDS)}
