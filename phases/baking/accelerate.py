"""Inference acceleration, measured: batched greedy decoding, the KV cache, and torch.compile.

- Batched greedy decoding (:func:`greedy_batch`): prompts are left-padded into one (B, T) batch with a
  (B, T) attention mask, positions derived from the mask (cumsum - 1), every step one full forward (no
  cache), each row stopping on its own. For a model whose outputs do not depend on left padding this
  yields exactly the tokens of decoding each prompt alone. Cognate with its Titans memory
  (``memory_enabled``) is not such a model: the memory writes in fixed chunks of absolute positions and
  averages its gates over a chunk's real tokens, so k pad tokens in front shift every chunk boundary and
  change what each token reads (the test shows the logits differ). For those models left-padded batching
  is reported as not applicable, and :func:`greedy_batch` batches only prompts of equal length (no padding
  needed; rows that finish leave the batch), which is exact.
- KV cache (:func:`kv_cache_support`): Cognate has none by design (per-token ACT pondering and the chunked
  memory make a token's cached states depend on the step; ``phases/cognate/modeling.py``). For a Hugging
  Face model with ``config.use_cache``, ``generate(use_cache=True)`` is measured against ``False``.
- torch.compile: compile time (the first call) is recorded apart from the steady-state forward latency of
  compiled vs eager, timed interleaved; a failure to compile (no C++ compiler, unsupported op) is
  recorded with its message instead.

Every entry gets ``applied`` and ``reason`` by one rule: the outputs must be identical (tokens) or within
tolerance (logits, and the same argmax everywhere), and the measured speedup must reach ``min_speedup``.
Timings compare only with each other: same machine, same process, interleaved.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from .graph import logits_parity, p50, paired_latency_ms

__all__ = ["greedy_batch", "kv_cache_support", "left_padding_exact", "measure_acceleration"]

_NO_CACHE_REASON = ("Cognate has no KV cache: per-token ACT pondering (the pondered block runs a data-dependent "
                    "number of steps) and the chunked Titans memory make a token's cached states depend on the "
                    "step, so generation recomputes the whole prefix (phases/cognate/modeling.py)")


def _device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _is_cognate(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "cognate"


def left_padding_exact(model: nn.Module) -> tuple[bool, str]:
    """Whether left padding leaves the real tokens' outputs unchanged (so padded batches are exact).

    Returns:
        (exact, reason). False for Cognate with ``memory_enabled`` (module docstring).
    """
    cfg = getattr(model, "config", None)
    if _is_cognate(model) and getattr(cfg, "memory_enabled", False):
        return False, ("the Titans memory writes in chunks of absolute positions (memory_chunk_size="
                       f"{cfg.memory_chunk_size}) and averages its gates over each chunk's real tokens, so left "
                       "padding shifts the chunk boundaries and changes the outputs; batches group equal-length "
                       "prompts instead")
    return True, "padding is masked out of attention and positions derive from the attention mask"


def _pad_left(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)  # (B, T) each


def _greedy_rows(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                 pad_id: int, stop: Callable[[list[int]], bool] | None) -> list[list[int]]:
    device = _device(model)
    ids = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts))) if max_new_tokens > 0 else []
    while active:
        x, mask = _pad_left([ids[i] for i in active], pad_id, device)  # width = longest active row: no dead columns
        kwargs = {}
        if not bool(mask.all()):
            kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
        tokens = model(input_ids=x, use_cache=False, **kwargs).logits[:, -1].argmax(-1).tolist()  # (B,)
        still = []
        for i, token in zip(active, tokens):
            if eos_id is not None and token == eos_id:
                continue
            ids[i].append(token)
            new[i].append(token)
            if len(new[i]) < max_new_tokens and not (stop is not None and stop(new[i])):
                still.append(i)
        active = still
    return new


@torch.no_grad()
def greedy_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int | None,
                 pad_id: int, stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy decoding of all ``prompts`` in one left-padded batch (no KV cache).

    A row stops at ``eos_id`` (not included in its output), when ``stop(its new tokens)`` is true (the last
    token kept), or after ``max_new_tokens``; finished rows leave the batch. For a model where left padding
    changes outputs (:func:`left_padding_exact`) only prompts of equal length share a batch.

    Args:
        model: causal LM called as ``model(input_ids, attention_mask, position_ids)`` -> ``.logits`` (B, T, V);
            in eval mode for the call, restored after.
        prompts: token id lists, each non-empty.
        max_new_tokens: the most tokens per row (>= 0).
        eos_id: end-of-sequence id or None; pad_id: the id written into padding (masked out).
        stop: optional predicate on a row's new tokens.
    Returns:
        The new tokens of each prompt, in prompt order.
    Raises:
        ValueError: an empty prompt or negative ``max_new_tokens``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    empty = [i for i, p in enumerate(prompts) if not len(p)]
    if empty:
        raise ValueError(f"prompts must be non-empty; prompt(s) {empty[:5]} are empty")
    exact, _ = left_padding_exact(model)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(0 if exact else len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for idx in groups.values():
            for i, tokens in zip(idx, _greedy_rows(model, [list(prompts[i]) for i in idx], max_new_tokens,
                                                   eos_id, pad_id, stop)):
                out[i] = tokens
    finally:
        model.train(was_training)
    return out


def kv_cache_support(model: nn.Module) -> tuple[bool, str]:
    """Whether ``model`` can generate with a KV cache, and why.

    Returns:
        (False, Cognate's design reason) for Cognate; (True, ...) for a Hugging Face generation model whose
        config has ``use_cache``; else (False, what is missing).
    """
    if _is_cognate(model):
        return False, _NO_CACHE_REASON
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(getattr(model, "generate", None)):
        return False, f"{type(model).__name__} is not a Hugging Face generation model (no config/generate)"
    if not hasattr(cfg, "use_cache"):
        return False, f"{type(cfg).__name__} has no use_cache field"
    return True, f"{type(model).__name__}: config.use_cache, generate(use_cache=True) keeps past key/values"


def _decide(entry: dict, parity: bool, speedup: float, min_speedup: float, what: str) -> dict:
    if not parity:
        entry["applied"], entry["reason"] = False, f"{what}: outputs differ from the baseline"
    elif speedup < min_speedup:
        entry["applied"] = False
        entry["reason"] = f"{what}: measured speedup {speedup:.3f}x < min_speedup {min_speedup:g}x"
    else:
        entry["applied"] = True
        entry["reason"] = f"{what}: same outputs, measured speedup {speedup:.3f}x >= {min_speedup:g}x"
    return entry


def _measure_batching(model, prompts, max_new_tokens, eos_id, pad_id, batch_size, repeats, min_speedup) -> dict:
    def sequential():
        return [greedy_batch(model, [p], max_new_tokens, eos_id=eos_id, pad_id=pad_id)[0] for p in prompts]

    def batched():
        return [t for s in range(0, len(prompts), batch_size)
                for t in greedy_batch(model, prompts[s:s + batch_size], max_new_tokens, eos_id=eos_id, pad_id=pad_id)]

    seq_tokens, bat_tokens = sequential(), batched()  # also the warm-up
    times = paired_latency_ms({"sequential": sequential, "batched": batched}, repeats=repeats, warmup=0,
                              device=_device(model))
    seq_s, bat_s = p50(times["sequential"]) / 1e3, p50(times["batched"]) / 1e3
    n_tokens = sum(len(t) for t in seq_tokens)
    exact, why = left_padding_exact(model)
    entry = {"batch_size": batch_size, "prompts": len(prompts), "new_tokens": n_tokens,
             "sequential_s": seq_s, "batched_s": bat_s,
             "sequential_tokens_per_s": n_tokens / max(seq_s, 1e-9),
             "batched_tokens_per_s": n_tokens / max(bat_s, 1e-9),
             "speedup": seq_s / max(bat_s, 1e-9), "parity": seq_tokens == bat_tokens,
             "left_padding": {"applicable": exact, "reason": why},
             "mode": "left-padded batches" if exact else "equal-length groups (left padding not applicable)"}
    return _decide(entry, entry["parity"], entry["speedup"], min_speedup, "batched greedy")


def _measure_kv_cache(model, prompts, max_new_tokens, eos_id, pad_id, repeats, min_speedup) -> dict:
    supported, why = kv_cache_support(model)
    if not supported:
        return {"supported": False, "reason": why, "applied": False}
    device = _device(model)

    def run(use_cache: bool) -> list[list[int]]:
        outs = []
        for p in prompts:
            x = torch.tensor([p], dtype=torch.long, device=device)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, use_cache=use_cache, pad_token_id=pad_id, eos_token_id=eos_id)
            outs.append(y[0, len(p):].tolist())
        return outs

    cached, uncached = run(True), run(False)
    times = paired_latency_ms({"cache": lambda: run(True), "no_cache": lambda: run(False)}, repeats=repeats,
                              warmup=0, device=device)
    with_s, without_s = p50(times["cache"]) / 1e3, p50(times["no_cache"]) / 1e3
    n_tokens = sum(len(t) for t in uncached)
    entry = {"supported": True, "support_reason": why, "no_cache_s": without_s, "cache_s": with_s,
             "no_cache_tokens_per_s": n_tokens / max(without_s, 1e-9),
             "cache_tokens_per_s": n_tokens / max(with_s, 1e-9),
             "speedup": without_s / max(with_s, 1e-9), "parity": cached == uncached}
    return _decide(entry, entry["parity"], entry["speedup"], min_speedup, "KV cache")


def _measure_compile(model, prompt, repeats, min_speedup, backend, atol) -> dict:
    """The measurement, then Dynamo's caches and hooks released (``torch._dynamo.reset``): the
    compiled graph is only measured here, and a process that keeps them (a Ray worker, a test
    process) should not carry them on."""
    try:
        return _compile_entry(model, prompt, repeats, min_speedup, backend, atol)
    finally:
        torch._dynamo.reset()


def _compile_entry(model, prompt, repeats, min_speedup, backend, atol) -> dict:
    x = torch.tensor([prompt], dtype=torch.long, device=_device(model))  # (1, T)
    eager_logits = model(input_ids=x).logits
    try:
        compiled = torch.compile(model, backend=backend)
        start = time.perf_counter()
        compiled_logits = compiled(input_ids=x).logits  # compilation happens on the first call
        compile_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "not available here"; keep its message
        return {"available": False, "backend": backend, "reason": f"{type(exc).__name__}: {str(exc)[:500]}",
                "applied": False}
    entry = {"available": True, "backend": backend, "compile_s": compile_s}
    entry |= logits_parity(eager_logits, compiled_logits)
    times = paired_latency_ms({"eager": lambda: model(input_ids=x), "compiled": lambda: compiled(input_ids=x)},
                              repeats=repeats, device=x.device)
    entry["eager_ms_p50"], entry["compiled_ms_p50"] = p50(times["eager"]), p50(times["compiled"])
    entry["speedup"] = entry["eager_ms_p50"] / max(entry["compiled_ms_p50"], 1e-9)
    entry["parity"] = entry["max_abs_diff"] <= atol and entry["top1_agreement"] == 1.0
    return _decide(entry, entry["parity"], entry["speedup"], min_speedup, "torch.compile")


@torch.no_grad()
def measure_acceleration(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int | None,
                         pad_id: int, batch_size: int = 8, compile: bool = True, repeats: int = 3,
                         min_speedup: float = 1.05, compile_backend: str = "inductor",
                         compile_repeats: int = 10, atol: float = 1e-3) -> dict:
    """Measure batched decoding, the KV cache and torch.compile on this machine.

    Args:
        model: causal LM (measured in eval mode, restored after; never modified).
        prompts: token id lists to decode; ``prompts[0]`` is the compile benchmark's input.
        max_new_tokens, eos_id, pad_id: as in :func:`greedy_batch`.
        batch_size: prompts per batch in the batched run.
        compile: measure torch.compile (False: reported as not measured).
        repeats: timed runs of each whole generation; compile_repeats: timed forwards.
        min_speedup: speedup an entry must reach to be applied.
        compile_backend: torch.compile backend ("inductor"; "eager" checks tracing only).
        atol: largest absolute logit difference compiled vs eager.
    Returns:
        ``{"batching": {... tokens/s sequential and batched, speedup, parity, left_padding, mode},
        "kv_cache": {"supported", "reason" | timings}, "compile": {"available", "compile_s",
        "eager_ms_p50", "compiled_ms_p50", "speedup", "max_abs_diff", "top1_agreement"} | {"available":
        False, "reason"}, "device", "threads"}``; each of the three has ``applied`` and ``reason``.
    Raises:
        ValueError: no prompts, batch_size < 1, or as :func:`greedy_batch`.
    """
    if not prompts or batch_size < 1:
        raise ValueError(f"need at least one prompt and batch_size >= 1, got {len(prompts)} prompts, "
                         f"batch_size={batch_size}")
    was_training = model.training
    model.eval()
    try:
        out = {"device": str(_device(model)), "threads": torch.get_num_threads(),
               "batching": _measure_batching(model, prompts, max_new_tokens, eos_id, pad_id, batch_size, repeats,
                                             min_speedup),
               "kv_cache": _measure_kv_cache(model, prompts, max_new_tokens, eos_id, pad_id, repeats, min_speedup)}
        if compile:
            out["compile"] = _measure_compile(copy.deepcopy(model).eval(), list(prompts[0]), compile_repeats,
                                              min_speedup, compile_backend, atol)
        else:
            out["compile"] = {"available": None, "applied": False, "reason": "not measured (compile=False)"}
    finally:
        model.train(was_training)
    return out

