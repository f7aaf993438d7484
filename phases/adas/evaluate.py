"""Phase 7's candidate pipeline: build a recipe's architecture and its deployed artifact, then
measure the artifact. Each step is one function, so each agent of the team runs one of them and
the benchmark runs them in a loop (``search_inline``).

1. :func:`build_architecture` applies the architecture genes in a fixed order (drop blocks, then
   prune the FFN width, then factorise the projections; ``build.py``), calibrated on training
   windows, and saves the result as an HF model dir (``arch/<arch key>``, shared by every recipe
   with those genes: the fp32 eager twin the parity check compares with, and the model phase 8
   receives if the recipe wins).
2. :func:`build_artifact` turns that model into the deployed artifact of the recipe's backend,
   precision and threads (``runtime.build_runner``) under ``artifacts/<recipe key>``.
3. :func:`measure_quality`: held-out next-token accuracy of the artifact, its retention vs the
   input model, and output parity vs its fp32 eager twin (``max |diff| / max |twin logit|``).
4. :func:`measure_speed`: the artifact reloaded inside :func:`measure.peak_rss_growth` (peak
   resident growth while it loads and runs one call; after one unmeasured load and call, so the
   process's one-off costs are not charged to whichever candidate comes first), then call latency (one forward of
   (batch, call_tokens)) and per-token latency (greedy steps of (batch, prompt_tokens) prompts),
   warm-up excluded.

Deterministic measures beside the timings (DESIGN "Determinism"): ``disk_bytes`` (the artifact's
files), ``flops_per_token`` (:func:`matmul_flops_per_token`) and ``accuracy``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phases.adas.recipes import Recipe

__all__ = ["ARCH_FILE", "build_architecture", "build_artifact", "call_inputs", "load_architecture",
           "matmul_flops_per_token", "measure_quality", "measure_speed"]

ARCH_FILE = "arch.json"


def matmul_flops_per_token(model: nn.Module) -> int:
    """2 x the weights of every Linear layer one token passes through (multiply-adds x 2): the
    pondered ACT block counts ``act_max_steps_infer`` times (the most steps inference runs, what
    the exported graph always runs). Attention's score products (which grow with the context)
    and the norms are left out; they differ little between recipes at one length."""
    steps = int(getattr(getattr(model, "config", None), "act_max_steps_infer", 1) or 1)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            n = module.weight.numel()
            total += n * steps if ".act.block." in f".{name}." else n
    return 2 * total


def build_architecture(model: nn.Module, recipe: Recipe, calibration: torch.Tensor, out_dir: str | Path,
                       tokenizer_from: str | Path | None = None) -> dict[str, Any]:
    """Apply ``recipe``'s architecture genes to ``model`` (not modified) and save the result.

    Args:
        calibration: (N, T) training ids for Block Influence and the FFN neuron scores.
        out_dir: the HF model dir to write (skipped when it holds a finished build already).
        tokenizer_from: a model dir whose tokenizer files are copied beside the weights.
    Returns:
        {"dir", "dropped", "ffn_width", "ranks", "params", "flops_per_token"}.
    """
    from phases.adas.build import drop_layers, low_rank, param_count, prune_ffn
    from phases.compression.package import TOKENIZER_FILES

    from serialization.checkpoint import atomic_write_json, publish_dir, staging_dir

    out = Path(out_dir)
    done = out / ARCH_FILE
    if done.is_file():
        return {**json.loads(done.read_text()), "dir": str(out)}
    built, dropped = drop_layers(model, recipe.drop_layers, calibration)
    built, ffn = prune_ffn(built, recipe.ffn_keep, calibration)
    built, ranks = low_rank(built, recipe.low_rank)
    info = {"dropped": dropped, "ffn_width": int(ffn.get("width", built.config.intermediate_size)),
            "ranks": dict(ranks), "params": param_count(built), "flops_per_token": matmul_flops_per_token(built)}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = staging_dir(out)
    built.save_pretrained(str(tmp))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
    atomic_write_json(tmp / ARCH_FILE, info)  # no path inside: the dir's bytes depend on the model and recipe only
    publish_dir(tmp, out)
    return {**info, "dir": str(out)}


def load_architecture(arch_dir: str | Path) -> nn.Module:
    """The fp32 eager model an :func:`build_architecture` dir holds, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import phases.cognate.modeling  # noqa: F401 - registers the Cognate family with the Auto classes

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(arch_dir)).eval()


def build_artifact(arch_dir: str | Path, recipe: Recipe, out_dir: str | Path, *, seq_len: int,
                   device: str = "cpu") -> dict[str, Any]:
    """The deployed artifact of ``recipe`` from its architecture (skipped when ``out_dir`` holds
    one already: a replayed task reuses it). Returns {"dir", "files", "disk_bytes"}."""
    from phases.adas.runtime import RUNTIME_FILE, build_runner, load_runner

    out = Path(out_dir)
    if (out / RUNTIME_FILE).is_file():
        runner = load_runner(out)
    else:
        runner = build_runner(load_architecture(arch_dir), backend=recipe.backend, precision=recipe.precision,
                              threads=recipe.threads, work_dir=out, seq_len=seq_len, device=device)
    return {"dir": str(out), "files": list(runner.files), "disk_bytes": int(runner.bytes_on_disk)}


def measure_quality(artifact_dir: str | Path, arch_dir: str | Path, windows: torch.Tensor, parity_ids: torch.Tensor,
                    *, reference_accuracy: float | None, batch_size: int = 8) -> dict[str, Any]:
    """Held-out accuracy of the artifact (``windows`` (N, T + 1)), its retention vs
    ``reference_accuracy`` (None: this is the reference), and parity vs the fp32 eager twin on
    ``parity_ids`` (B, T)."""
    from phases.adas.measure import parity, token_accuracy
    from phases.adas.runtime import load_runner
    from phases.adas.safety import retention

    runner = load_runner(artifact_dir)
    accuracy = token_accuracy(runner, windows, batch_size=batch_size)
    with torch.no_grad():
        twin = load_architecture(arch_dir)(input_ids=parity_ids).logits.float()
    par = parity(runner, twin, parity_ids)
    kept = None if reference_accuracy is None else retention(accuracy, reference_accuracy)
    return {"accuracy": accuracy, "retention": kept, "parity": par["max_rel_diff"],
            "max_abs_diff": par["max_abs_diff"], "argmax_agreement": par["argmax_agreement"]}


def measure_speed(artifact_dir: str | Path, call_ids: torch.Tensor, prompt_ids: torch.Tensor, new_tokens: int, *,
                  warmup: int, repeats: int, token_repeats: int) -> dict[str, Any]:
    """Peak resident growth of loading the artifact and running one call, then the call and
    per-token latencies (warm-up excluded). Returns the summary metrics and the raw samples
    (``call_samples_ms``, ``token_samples_ms``: the evidence the certificate cites)."""
    from phases.adas.measure import call_latency, peak_rss_growth, token_latency
    from phases.adas.runtime import load_runner

    def load_and_run():
        r = load_runner(artifact_dir)
        r.logits(call_ids)
        return r

    load_and_run()  # once unmeasured: the process's one-off costs (library init, first-use buffers) stay out
    runner, memory = peak_rss_growth(load_and_run)
    call = call_latency(runner, call_ids, warmup=warmup, repeats=repeats)
    token = token_latency(runner, prompt_ids, new_tokens, warmup=min(1, warmup), repeats=token_repeats)
    metrics: dict[str, Any] = {"memory_bytes": memory}
    for kind, stats in (("call", call), ("token", token)):
        for stat in ("p50", "p95", "p99", "mean", "max"):
            metrics[f"{kind}_{stat}_ms"] = float(stats[stat])
    batch, seq = call_ids.shape
    metrics["tokens_per_s"] = 1000.0 * batch * seq / metrics["call_mean_ms"] if metrics["call_mean_ms"] > 0 else None
    return {"metrics": metrics, "call_samples_ms": [float(x) for x in call["samples_ms"]],
            "token_samples_ms": [float(x) for x in token["samples_ms"]]}


def call_inputs(windows: torch.Tensor, recipe: Recipe, profile: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The timed inputs of ``recipe`` under ``profile``: (batch, call_tokens) call ids and
    (batch, prompt_tokens) prompts, cut from the held-out ``windows`` (rows reused cyclically)."""
    rows = torch.arange(recipe.batch_size) % windows.shape[0]
    need = max(profile.call_tokens, profile.prompt_tokens)
    if need > windows.shape[1]:
        raise ValueError(f"the profile's call_tokens/prompt_tokens ({need}) exceed the held-out windows' length "
                         f"{windows.shape[1]}")
    return windows[rows, : profile.call_tokens], windows[rows, : profile.prompt_tokens]

