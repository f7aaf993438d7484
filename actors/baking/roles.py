"""The nine agents of phase 6's baking team: thin shells over ``phases/baking/``.

Each role handles the tasks of the coordinator's graph (:mod:`actors.baking.graph`). A task's
payload carries the shared settings (``input`` model dir, ``work`` dir, ``out`` package dir,
``data``, ``seed``, ``cfg`` = the ``baking:`` section, ``eval``); its output is small plain data
(paths, measured numbers), and every file it writes goes to a path named after the task,
atomically, so a replay after a crash rewrites the same bytes. The roles keep no state between
tasks, so a restarted agent needs no checkpoint.

| role | tasks | what it does |
|---|---|---|
| baking-coordinator | plan, report | the train / held-out questions; the phase's report |
| hardware-adapter | target | device, dtype and threads for this machine, measured |
| memory-optimizer | memory | activation checkpointing, weight tying, dtype: measured memory |
| model-optimizer | tool-data, tool-bake, persona-bake | Toolformer's data step; the two fine-tunes |
| quality-validator | validate-before, validate-after | tool and task accuracy, perplexity, traits; the gate |
| baking-profiler | profile | latency, throughput, memory: input, baked, optimised |
| graph-optimizer | graph | fused QKV, folded norms: parity and speed measured |
| inference-accelerator | accelerate | batched generation, KV cache, torch.compile: measured |
| deployment-preparer | package | the handoff package for phase 7 |

Measuring roles run with one torch thread (``set_threads``) unless the hardware adapter's
choice is what they measure (the profiler's "optimised" model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from actors.io import corpus_for, load_hf, set_threads
from actors.roles import StatelessRole
from coordinator.errors import PhaseError
from serialization.checkpoint import atomic_write_json

__all__ = ["BakingCoordinator", "DeploymentPreparer", "GraphOptimizer", "HardwareAdapter", "InferenceAccelerator",
           "MemoryOptimizer", "ModelOptimizer", "PerformanceProfiler", "QualityValidator"]

_MIB = 2.0 ** 20


class _BakingRole(StatelessRole):
    """Imports the heavy libraries when the actor starts (``config["warm"]``): the agents spawn
    together, so their imports overlap instead of delaying each first task in turn."""

    def setup(self, context: Any) -> None:
        if context.config.get("warm", True):
            import transformers  # noqa: F401

            import phases.cognate.modeling  # noqa: F401
            import phases.data.corpus  # noqa: F401
            set_threads()


def _task_dir(payload: dict[str, Any], task: str) -> Path:
    d = Path(payload["work"]) / task
    d.mkdir(parents=True, exist_ok=True)
    return d


def _tokenizer(payload: dict[str, Any]):
    return corpus_for(payload).tokenizer


def _questions(inputs: dict[str, Any], split: str) -> list[Any]:
    from phases.baking.tooldata import ToolQuestion

    data = json.loads(Path(inputs["plan"]["questions"]).read_text())
    return [ToolQuestion(**q) for q in data[split]]


def _windows(payload: dict[str, Any], n: int | None = None):
    """Held-out evaluation windows (W, T + 1)."""
    ev = payload["eval"]
    return corpus_for(payload).windows("heldout", max_windows=n or int(ev["batch_size"]) * int(ev["batches"]))


def _profile_ids(payload: dict[str, Any]):
    """The profiling input: one held-out window (1, T)."""
    return _windows(payload, 1)[:, :-1]


def _prompt_ids(payload: dict[str, Any], inputs: dict[str, Any]) -> list[list[int]]:
    """The held-out questions' prompts as ids, ``[eos] + prompt`` (the generation measurements'
    input)."""
    tok = _tokenizer(payload)
    n = int(payload["cfg"]["profile_prompts"])
    return [[tok.eos_id] + tok.encode(q.prompt) for q in _questions(inputs, "heldout")[:n]]


# ------------------------------------------------------------------------------- coordinator

class BakingCoordinator(_BakingRole):
    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        if task == "plan":
            return self._plan(payload)
        if task == "report":
            return self._report(payload, inputs)
        raise ValueError(f"baking-coordinator has no task {task!r} (plan, report)")

    def _plan(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Training and held-out questions, per tool, from the seed: the held-out lookups ask
        about knowledge keys the training questions never name."""
        from dataclasses import asdict

        from actors.baking.graph import task_names
        from phases.baking.tooldata import make_questions, split_keys
        from phases.training import derived_seed

        cfg, seed = payload["cfg"], int(payload["seed"])
        train_keys, heldout_keys = split_keys(derived_seed(seed, "baking-keys"), float(cfg["heldout_key_fraction"]))
        heldout = make_questions(derived_seed(seed, "baking-heldout"), int(cfg["eval_questions"]), keys=heldout_keys,
                                 max_operand=int(cfg["max_operand"]), tools=tuple(cfg["tools"]))
        train = make_questions(derived_seed(seed, "baking-train"), int(cfg["tool_questions"]), keys=train_keys,
                               max_operand=int(cfg["max_operand"]), tools=tuple(cfg["tools"]),
                               exclude={q.question for q in heldout})
        path = _task_dir(payload, "plan") / "questions.json"
        atomic_write_json(path, {"train": [asdict(q) for q in train], "heldout": [asdict(q) for q in heldout],
                                 "train_keys": sorted(train_keys), "heldout_keys": sorted(heldout_keys)})
        return {"questions": str(path), "train": len(train), "heldout": len(heldout),
                "heldout_keys": len(heldout_keys), "tasks": task_names()}

    def _report(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """``baking_report.json``: what was baked and measured that is a function of the config
        and seed (its hash is stable); every timing and timing-based decision goes to
        ``timings.json``."""
        before, after = inputs["validate-before"], inputs["validate-after"]
        report = {
            "plan": {k: v for k, v in inputs["plan"].items() if k != "questions"},
            "tool_data": {k: v for k, v in inputs["tool-data"].items() if k != "data"},
            "tool_bake": {k: v for k, v in inputs["tool-bake"].items() if k != "model"},
            "persona_bake": {k: v for k, v in inputs["persona-bake"].items() if k != "model"},
            "before": before, "after": after,
            "memory": {k: inputs["memory"][k] for k in ("weight_tying", "checkpointing_applied")},
            "package": {k: v for k, v in inputs["package"].items() if k not in ("model", "deployment")},
        }
        timings = {
            "target": inputs["target"], "memory": inputs["memory"], "graph": inputs["graph"],
            "accelerate": inputs["accelerate"], "profile": inputs["profile"],
        }
        d = _task_dir(payload, "report")
        atomic_write_json(d / "baking_report.json", report)
        atomic_write_json(d / "timings.json", timings)
        return {"report": str(d / "baking_report.json"), "timings": str(d / "timings.json")}


# ------------------------------------------------------------------------------- hardware, memory

class HardwareAdapter(_BakingRole):
    """``target``: the device, dtype and torch threads the input model runs fastest with on this
    machine (a lower dtype only where its top-1 agreement holds), each candidate measured."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.baking.hardware import choose_target

        set_threads()
        cfg = payload["cfg"]
        return choose_target(load_hf(payload["input"]), _profile_ids(payload), repeats=int(cfg["profile_repeats"]),
                             min_agreement=float(cfg["min_agreement"]))


class MemoryOptimizer(_BakingRole):
    """``memory``: activation checkpointing (activation bytes of one training step with and
    without; applied to the fine-tunes only when a step's activations exceed the budget),
    weight tying (applied only within the loss tolerance) and the storage dtype, measured on the
    input model with the fine-tunes' batch shape."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.baking.memory import measure_memory

        set_threads()
        cfg = payload["cfg"]
        corpus = corpus_for(payload)
        batch = corpus.batch(0, int(cfg["tool_batch_size"]), corpus.config.seq_len, int(payload["seed"]))[:, :-1]
        result = measure_memory(load_hf(payload["input"]), batch, tie_tolerance=float(cfg["tie_tolerance"]),
                                min_agreement=float(cfg["min_agreement"]),
                                budget_bytes=int(float(cfg["memory_budget_mb"]) * _MIB))
        return {**result, "checkpointing_applied": bool(result["checkpointing"]["applied"])}


# ------------------------------------------------------------------------------- model optimizer

class ModelOptimizer(_BakingRole):
    """``tool-data``: Toolformer's data step on the input model; ``tool-bake``: fine-tune on the
    kept data; ``persona-bake``: Prompt Baking of the persona into the tool-baked model. A BitNet
    input trains quantization-aware and is exported ternary again (phase 8 stores it so)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        set_threads()
        if task == "tool-data":
            return self._tool_data(payload, inputs)
        if task == "tool-bake":
            return self._tool_bake(payload, inputs)
        if task == "persona-bake":
            return self._persona_bake(payload, inputs)
        raise ValueError(f"model-optimizer has no task {task!r} (tool-data, tool-bake, persona-bake)")

    def _load(self, payload: dict[str, Any], model_dir: str, checkpointing: bool):
        from phases.baking.memory import enable_checkpointing
        from phases.bitnet.train import load_trainable

        model, tokenizer, bitnet = load_trainable(Path(model_dir), _tokenizer(payload).vocab_size, "baking")
        if checkpointing:
            enable_checkpointing(model)
        return model, tokenizer, bitnet

    def _tool_data(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """Toolformer's filter, judged first by the input model as it is (recorded), then by the
        input model after the warm-up (``filter_warmup_steps``; phases/baking/tooldata.py says
        why): the latter's decisions make the data."""
        import copy

        from phases.baking.tooldata import finetune_texts, toolformer_data, warmup_texts
        from phases.training import derived_seed

        cfg, seed = payload["cfg"], int(payload["seed"])
        tok = _tokenizer(payload)
        questions = _questions(inputs, "train")
        model = load_hf(payload["input"])
        threshold = float(cfg["filter_threshold"])
        by_input = toolformer_data(model, tok, questions, threshold=threshold)
        judge, steps = model, int(cfg["filter_warmup_steps"])
        if steps:
            judge = copy.deepcopy(model)
            plain, per_batch = _plain_rows(payload, cfg)
            finetune_texts(judge, tok, warmup_texts(questions), steps=steps, lr=float(cfg["tool_lr"]),
                           batch_size=int(cfg["tool_batch_size"]), seed=derived_seed(seed, "filter-warmup"),
                           mask_results=bool(cfg["mask_results"]), plain_rows=plain, plain_per_batch=per_batch)
        data = toolformer_data(judge, tok, questions, threshold=threshold) if steps else by_input
        path = _task_dir(payload, "tool-data") / "data.json"
        atomic_write_json(path, {**data.to_json(), "by_input_model": by_input.to_json()})
        return {"data": str(path), "questions": len(data.texts), "candidates": data.candidates, "kept": data.kept,
                "kept_by_tool": data.kept_by_tool, "errors": data.errors, "kept_by_input": by_input.kept,
                "filter_warmup_steps": steps}

    def _export(self, payload, task, model, tokenizer, bitnet) -> str:
        from phases.baking.memory import disable_checkpointing
        from phases.bitnet.train import export_trained

        disable_checkpointing(model)
        out = _task_dir(payload, task) / "model"
        export_trained(model.eval(), tokenizer, out, bitnet)
        return str(out)

    def _tool_bake(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        from phases.baking.tooldata import finetune_texts

        cfg = payload["cfg"]
        texts = json.loads(Path(inputs["tool-data"]["data"]).read_text())["texts"]
        model, tokenizer, bitnet = self._load(payload, payload["input"], inputs["memory"]["checkpointing_applied"])
        plain, per_batch = _plain_rows(payload, cfg)
        losses = finetune_texts(model, _tokenizer(payload), texts, steps=int(cfg["tool_steps"]),
                                lr=float(cfg["tool_lr"]), batch_size=int(cfg["tool_batch_size"]),
                                seed=int(payload["seed"]), mask_results=bool(cfg["mask_results"]),
                                plain_rows=plain, plain_per_batch=per_batch)
        out = self._export(payload, "tool-bake", model, tokenizer, bitnet)
        return {"model": out, "steps": len(losses), "texts": len(texts),
                "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                "bitnet": bitnet is not None}

    def _persona_bake(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        from phases.baking.persona import bake, persona_prompt
        from phases.training import derived_seed

        cfg, seed = payload["cfg"], int(payload["seed"])
        model, tokenizer, bitnet = self._load(payload, inputs["tool-bake"]["model"],
                                              inputs["memory"]["checkpointing_applied"])
        tok = _tokenizer(payload)
        need = 1 + len(tok.encode(persona_prompt(cfg["traits"]))) + int(cfg["persona_question_tokens"]) + \
            int(cfg["persona_length"])
        limit = int(getattr(model.config, "max_position_embeddings", need))
        if need > limit:
            raise PhaseError("baking", f"the persona's teacher context is {need} tokens (prompt, "
                                       f"baking.persona_question_tokens, baking.persona_length), the model has "
                                       f"{limit} positions; lower those settings or shorten the traits")
        questions, val_questions = _persona_questions(payload, int(cfg["persona_questions"]),
                                                      int(cfg["persona_question_tokens"]))
        result = bake(model, tok, traits=cfg["traits"], questions=questions,
                      val_questions=val_questions, n_samples=int(cfg["persona_samples"]),
                      length=int(cfg["persona_length"]), temperature=float(cfg["persona_temperature"]),
                      steps=int(cfg["persona_steps"]), lr=float(cfg["persona_lr"]),
                      batch_size=int(cfg["persona_batch_size"]), seed=derived_seed(seed, "persona"),
                      method=cfg["persona_method"], lora_rank=int(cfg["lora_rank"]))
        out = self._export(payload, "persona-bake", result.model, tokenizer, bitnet)
        return {"model": out, "method": cfg["persona_method"], "prompt": persona_prompt(cfg["traits"]),
                "kl_before": result.kl_before, "kl_after": result.kl_after,
                "kl_reduction": result.reduction_factor, "steps": result.steps,
                "loss_first": result.losses[0] if result.losses else None,
                "loss_last": result.losses[-1] if result.losses else None}


def _plain_rows(payload: dict[str, Any], cfg: dict[str, Any]) -> tuple[list[list[int]], int]:
    """Plain training-text rows for the fine-tunes (``text_fraction`` of each batch) and how many
    go in each batch."""
    from phases.training import derived_seed

    batch = int(cfg["tool_batch_size"])
    per_batch = min(batch - 1, round(batch * float(cfg["text_fraction"])))
    if not per_batch:
        return [], 0
    corpus = corpus_for(payload)
    rows = corpus.batch(0, 256, corpus.config.seq_len, derived_seed(int(payload["seed"]), "baking-text"),
                        mix=_text_only())
    return rows.tolist(), per_batch


def _persona_questions(payload: dict[str, Any], n: int, k: int) -> tuple[list[str], list[str]]:
    """Prefixes (``k`` tokens) of training text and of held-out text: the contexts the persona's
    continuations are sampled after."""
    corpus = corpus_for(payload)
    tok, seq = corpus.tokenizer, corpus.config.seq_len
    train = corpus.batch(0, n, seq, int(payload["seed"]), mix=_text_only())[:, :k]
    held = corpus.windows("heldout", max_windows=n)[:, :k]
    return [tok.decode(r.tolist()) for r in train], [tok.decode(r.tolist()) for r in held]


def _text_only():
    from phases.data import TaskMix

    return TaskMix(text=1.0, arithmetic=0.0, modular=0.0, tool=0.0)


# ------------------------------------------------------------------------------- validator

class QualityValidator(_BakingRole):
    """``validate-before`` (the input) and ``validate-after`` (the baked model): tool-call and
    task accuracy on the held-out questions through the inference loop that executes the calls,
    held-out perplexity, the trait scores; after: the quality gate."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import math

        from phases.baking.evaluate import evaluate_tools
        from phases.data import mean_nll

        set_threads()
        cfg = payload["cfg"]
        after = task == "validate-after"
        if task not in ("validate-before", "validate-after"):
            raise ValueError(f"quality-validator has no task {task!r} (validate-before, validate-after)")
        model = load_hf(inputs["persona-bake"]["model"] if after else payload["input"])
        tok = _tokenizer(payload)
        tools = evaluate_tools(model, tok, _questions(inputs, "heldout"), max_new_tokens=int(cfg["max_new_tokens"]),
                               max_calls=int(cfg["max_calls"]))
        nll = mean_nll(model, _windows(payload), batch_size=int(payload["eval"]["batch_size"]))
        out: dict[str, Any] = {"tools": tools, "nll": nll, "perplexity": math.exp(nll)}
        if not after:
            from phases.baking.persona import persona_prompt
            from phases.baking.traits import trait_scores

            out["traits"] = trait_scores(model, tok, cfg["traits"])
            out["traits_prompted"] = trait_scores(model, tok, cfg["traits"], prefix_text=persona_prompt(cfg["traits"]))
            return out
        from phases.baking.traits import gap_closed, trait_scores

        before = inputs["validate-before"]
        out["traits"] = trait_scores(model, tok, cfg["traits"])
        out["traits_gap_closed"] = {t: gap_closed(before["traits"][t], before["traits_prompted"][t], out["traits"][t])
                                    for t in cfg["traits"]}
        ratio = out["perplexity"] / before["perplexity"]
        gain = tools["tool_call_accuracy"] - before["tools"]["tool_call_accuracy"]
        reasons = []
        if ratio > float(cfg["max_perplexity_ratio"]):
            reasons.append(f"held-out perplexity rose {ratio:.3f}x (baking.max_perplexity_ratio "
                           f"{float(cfg['max_perplexity_ratio']):g})")
        if gain < float(cfg["min_tool_gain"]):
            reasons.append(f"tool-call accuracy changed by {gain:+.3f} (baking.min_tool_gain "
                           f"{float(cfg['min_tool_gain']):g})")
        return {**out, "perplexity_ratio": ratio, "tool_call_gain": gain, "passed": not reasons, "reasons": reasons}


# ------------------------------------------------------------------------------- profiler

class PerformanceProfiler(_BakingRole):
    """``profile``: the input model, the baked model as stored and the baked model with what the
    optimisers applied (the graph rewrites, the hardware adapter's dtype and threads), on the same
    input, in this process (the graph runs it when no other agent computes): each one's latency
    p50/p95, throughput and peak memory of a forward (``profile_model``), and the latency ratios
    vs the input from forwards timed interleaved (``paired_latency_ms``: models timed one after
    the other differ by warm-up and drift as much as by what changed)."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import torch

        from phases.baking.graph import apply_rewrites, p50, paired_latency_ms
        from phases.baking.hardware import apply_target
        from phases.compression.profile import compare, profile_model

        set_threads()
        repeats = int(payload["cfg"]["profile_repeats"])
        ids = _profile_ids(payload)
        baked_dir = inputs["persona-bake"]["model"]
        models = {"input": load_hf(payload["input"]), "baked": load_hf(baked_dir)}
        optimised = load_hf(baked_dir)
        apply_rewrites(optimised, inputs["graph"]["chosen"])
        target = inputs["target"]
        threads = torch.get_num_threads()
        try:  # the target's threads hold for all three (one process), so the ratios compare models
            models["optimised"] = apply_target(optimised, target)
            device_ids = {n: ids.to(next(m.parameters()).device) for n, m in models.items()}
            profiles = {n: profile_model(m, device_ids[n], repeats=repeats) for n, m in models.items()}
            with torch.no_grad():
                times = paired_latency_ms({n: (lambda m=m, x=device_ids[n]: m(input_ids=x)) for n, m in models.items()},
                                          repeats=repeats)
        finally:
            torch.set_num_threads(threads)
        ratios = compare(profiles, "input")
        out = {name: {**p.to_json(), **ratios.get(name, {})} for name, p in profiles.items()}
        for name in out:
            out[name]["paired_latency_ms_p50"] = p50(times[name])
            out[name]["latency_ratio"] = p50(times[name]) / p50(times["input"])
        return out


# ------------------------------------------------------------------------------- graph, accelerator

class GraphOptimizer(_BakingRole):
    """``graph``: fused QKV and folded norms on the baked model, each alone and together: output
    parity and speed measured; a rewrite is chosen only when it keeps the outputs and is faster
    (``min_speedup``). Fallback (``safe``): nothing is rewritten; the report says why."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.baking.graph import measure_rewrites

        if payload.get("safe"):
            return {"chosen": [], "fell_back": True, "reason": "the rewrite measurement failed: nothing rewritten"}
        set_threads()
        cfg = payload["cfg"]
        return measure_rewrites(load_hf(inputs["persona-bake"]["model"]), _profile_ids(payload),
                                repeats=int(cfg["profile_repeats"]), min_speedup=float(cfg["min_speedup"]))


class InferenceAccelerator(_BakingRole):
    """``accelerate``: batched vs one-at-a-time greedy generation of the held-out prompts
    (identical tokens required), KV cache (where the architecture has one), ``torch.compile``
    (compile time reported apart): each measured, applied only when it keeps the outputs and is
    faster. Fallback (``safe``): without ``torch.compile``."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.baking.accelerate import measure_acceleration

        set_threads()
        cfg = payload["cfg"]
        tok = _tokenizer(payload)
        result = measure_acceleration(load_hf(inputs["persona-bake"]["model"]), _prompt_ids(payload, inputs),
                                      int(cfg["profile_new_tokens"]), eos_id=tok.eos_id, pad_id=tok.eos_id,
                                      batch_size=int(cfg["profile_prompts"]),
                                      compile=bool(cfg["compile"]) and not payload.get("safe"),
                                      repeats=max(1, int(cfg["profile_repeats"]) // 5),
                                      min_speedup=float(cfg["min_speedup"]))
        return {**result, "fell_back": bool(payload.get("safe"))}


# ------------------------------------------------------------------------------- deployment

class DeploymentPreparer(_BakingRole):
    """``package``: the handoff for phase 7 at ``payload["out"]`` (only for a model that passed the
    quality gate): the baked model and tokenizer,
    the tool registry (``tools.json``, ``knowledge.json``) and the baked persona
    (``persona.json``), all functions of the config and seed; beside it, ``deployment.json``:
    the inference settings the optimisers measured and chose (timing-based: independent runs may
    choose differently) and the measured metrics."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.baking.tools import CALL_RE, KNOWLEDGE_PATH, RESULT_SEP, TOOLS
        from serialization.checkpoint import publish_dir, staging_dir

        cfg = payload["cfg"]
        validation = inputs["validate-after"]
        if not validation["passed"]:  # nothing is handed on: the phase fails with the gate's reasons
            return {"model": None, "deployment": None, "refused": validation["reasons"]}
        out = Path(payload["out"])
        tmp = staging_dir(out)
        shutil.copytree(inputs["persona-bake"]["model"], tmp, dirs_exist_ok=True)
        tools = {"call_syntax": "<tool>name(argument)</tool>", "result_separator": RESULT_SEP,
                 "call_regex": CALL_RE.pattern, "max_calls": int(cfg["max_calls"]),
                 "tools": {n: {"description": TOOLS[n].description} for n in cfg["tools"]},
                 "knowledge_file": "knowledge.json"}
        atomic_write_json(tmp / "tools.json", tools)
        shutil.copy2(KNOWLEDGE_PATH, tmp / "knowledge.json")
        persona = inputs["persona-bake"]
        atomic_write_json(tmp / "persona.json", {"traits": cfg["traits"], "prompt": persona["prompt"],
                                                 "method": persona["method"], "kl_before": persona["kl_before"],
                                                 "kl_after": persona["kl_after"],
                                                 "kl_reduction": persona["kl_reduction"]})
        publish_dir(tmp, out)
        target, memory, graph, acc = inputs["target"], inputs["memory"], inputs["graph"], inputs["accelerate"]
        deployment = {
            "model": str(out), "device": target["device"], "dtype": target["dtype"],
            "threads": target["num_threads"], "graph_rewrites": graph["chosen"],
            "batched_generation": acc["batching"]["applied"], "kv_cache": acc["kv_cache"]["applied"],
            "torch_compile": acc["compile"]["applied"],
            "storage_dtype": memory["dtype"]["chosen"],
            "note": "device, dtype, threads, rewrites and decoders were chosen by timings on the machine the team "
                    "ran on: independent runs may choose differently; the weights do not depend on them",
            "validation": {k: inputs["validate-after"][k] for k in ("passed", "reasons", "perplexity_ratio",
                                                                    "tool_call_gain")},
            "profile": inputs["profile"],
        }
        path = _task_dir(payload, "package") / "deployment.json"
        atomic_write_json(path, deployment)
        files = sorted(p.name for p in out.iterdir())
        return {"model": str(out), "deployment": str(path), "files": files}
