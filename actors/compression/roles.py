"""The nine agents of phase 8's compression team: thin shells over ``phases/compression/``.

Each role handles the tasks the orchestrator's graph (:mod:`actors.compression.graph`) sends it.
A task's payload carries the shared settings (``input`` model dir, ``work`` dir, ``data``,
``seed``, ``cfg`` = the ``compress:`` section, ``eval``) plus its own; its output is small
plain data (paths, measured numbers) and every file it writes goes to a path named after the
task, atomically, so a replay after a crash rewrites the same bytes. The roles keep no state
between tasks (what they need is on disk), so a restarted agent needs no checkpoint.

| role | tasks | what it does |
|---|---|---|
| model-analyzer | analyze | per-weight statistics, measured int4 sensitivity |
| compression-orchestrator | plan, report | per-weight sparsity from the sensitivities; the final summary |
| pruning-agent | prune*, student | magnitude / Taylor / structured masks; the narrower student |
| knowledge-distiller | distill* | teacher -> student (T = 4, alpha = 0.7), masks held |
| quantization-agent | quantize-<codec> | every weight matrix in one codec, written as a package |
| architecture-optimizer | search | NSGA-II over one codec per matrix; Pareto front; the choice |
| compression-validator | validate | retention, perplexity, parity on held-out data; the gate |
| deployment-packager | package | the chosen recipe's package (the phase's model), ONNX |
| performance-profiler | profile | latency p50/p95, throughput, memory, bytes on disk |
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from actors.io import corpus_for, load_hf, quality_of, save_hf, set_threads
from actors.roles import StatelessRole
from serialization.checkpoint import atomic_write_json

__all__ = ["ArchitectureOptimizer", "CompressionOrchestrator", "CompressionValidator", "DeploymentPackager",
           "KnowledgeDistiller", "ModelAnalyzer", "PerformanceProfiler", "PruningAgent", "QuantizationAgent"]


class _CompressionRole(StatelessRole):
    """Imports the heavy libraries when the actor starts (``config["warm"]``, set by the team
    spec for agents that load models in this graph): the agents spawn together, so their imports
    (about 7 s of CPU each: torch, transformers' model classes) overlap instead of delaying each
    agent's first task in turn. Agents with no model work (the orchestrator; the pruning agent
    or distiller when the strategy has no such stage) skip them: on a 2-core machine that is a
    third of the team's start for the quantization strategy."""

    def setup(self, context: Any) -> None:
        if context.config.get("warm", True):
            import transformers  # noqa: F401

            import phases.cognate.modeling  # noqa: F401
            import phases.compression.codecs  # noqa: F401
            import phases.data.corpus  # noqa: F401
            set_threads()


def _hf_config(model: Any) -> dict[str, Any]:
    """The model's HF config as data, without ``_name_or_path`` (where it was loaded from: the
    package's bytes must not depend on where the run folder lives)."""
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    return cfg


def _model_dir(payload: dict[str, Any], inputs: dict[str, Any]) -> str:
    """The model this task works on: the output of its ``from`` task, else the phase's input."""
    src = payload.get("from")
    return inputs[src]["model"] if src else payload["input"]


def _task_dir(payload: dict[str, Any], task: str) -> Path:
    d = Path(payload["work"]) / task
    d.mkdir(parents=True, exist_ok=True)
    return d


def _masks_path(inputs: dict[str, Any]) -> str | None:
    """The pruning masks file an input task wrote (None when none did)."""
    return next((o["masks"] for o in inputs.values() if isinstance(o, dict) and o.get("masks")), None)


class ModelAnalyzer(_CompressionRole):
    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.compression.analyze import analyze

        set_threads()
        cfg = payload["cfg"]
        result = analyze(load_hf(payload["input"]), corpus_for(payload), batch_size=int(payload["eval"]["batch_size"]),
                         max_batches=int(payload["eval"]["batches"]), min_weights=int(cfg["min_weights"]))
        path = _task_dir(payload, task) / "analysis.json"
        atomic_write_json(path, result)
        return {"analysis": str(path), "sensitivity": {n: v["sensitivity"] for n, v in result["layers"].items()},
                "potential_ratio_estimate": result["potential_ratio_estimate"], "params": result["params"]}


class CompressionOrchestrator(_CompressionRole):
    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        if task == "plan":
            return self._plan(payload, inputs)
        if task == "report":
            return self._report(payload, inputs)
        raise ValueError(f"compression-orchestrator has no task {task!r} (plan, report)")

    def _plan(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        from phases.compression.pruning import layer_sparsities

        cfg = payload["cfg"]
        sens = inputs["analyze"]["sensitivity"]
        plan = {"strategy": cfg["strategy"], "stages": payload["stages"], "tasks": payload["tasks"],
                "per_weight_sparsity": layer_sparsities(sens, float(cfg["sparsity"]), float(cfg["sensitivity_spread"]))}
        atomic_write_json(_task_dir(payload, "plan") / "plan.json", plan)
        return plan

    def _report(self, payload: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        search, val, pkg, prof = (inputs[k] for k in ("search", "validate", "package", "profile"))
        quant = {k: v for k, v in inputs.items() if k.startswith("quantize-")}
        # Measured timings (profile, seconds per codec) vary from run to run: they go to
        # timings.json, so this report is a function of the config and seed (its hash is stable).
        report = {
            "strategy": payload["cfg"]["strategy"], "chosen": search["chosen"], "front": search["front"],
            "validation": val, "package": pkg,
            "codecs": {k.removeprefix("quantize-"): {"codec": v["codec"], "bits": v["bits"],
                                                    "fallback_from": v.get("fallback_from")} for k, v in quant.items()},
            "stages": {k: v for k, v in inputs.items() if k.startswith(("prune", "distill", "student"))},
            "analysis": inputs.get("analyze", {}).get("analysis"),
        }
        path = _task_dir(payload, "report") / "compression_report.json"
        atomic_write_json(path, _relative(report, Path(payload["phase_dir"])))
        timings = _task_dir(payload, "report") / "timings.json"
        atomic_write_json(timings, {"profile": prof, "codec_seconds": {k: v["seconds"] for k, v in quant.items()}})
        return {"report": str(path), "timings": str(timings)}


def _relative(obj: Any, root: Path) -> Any:
    """``obj`` with every path string under ``root`` made relative to it (the report's bytes then
    do not depend on where the run folder lives)."""
    if isinstance(obj, dict):
        return {k: _relative(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(root) + "/"):
        return obj[len(str(root)) + 1:]
    return obj


class PruningAgent(_CompressionRole):
    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import torch

        from phases.compression import pruning
        from serialization.checkpoint import save_tensors
        from phases.compression.student import narrow_ffn

        set_threads()
        cfg = payload["cfg"]
        model = load_hf(_model_dir(payload, inputs))
        out = _task_dir(payload, task)
        if task == "student":
            student = narrow_ffn(model, float(cfg["student_ff_fraction"]))
            save_hf(student, out / "model", payload["input"])
            return {"model": str(out / "model"), "params": sum(p.numel() for p in student.parameters()),
                    "intermediate_size": int(student.config.intermediate_size)}
        corpus = corpus_for(payload)
        batches = [corpus.batch(i, 4, corpus.config.seq_len, int(payload["seed"]))[:, :-1] for i in range(2)]
        per_weight = inputs["plan"]["per_weight_sparsity"] if "plan" in inputs else None
        target = float(payload["sparsity"])
        if per_weight:  # the plan's allocation is for the final sparsity: scale it to this step's
            scale = target / float(cfg["sparsity"]) if cfg["sparsity"] else 0.0
            per_weight = {n: min(0.95, s * scale) for n, s in per_weight.items()}
        masks = pruning.prune(model, method=cfg["pruning_method"], sparsity=target, per_weight=per_weight,
                              batches=batches)
        save_tensors(out / "masks.safetensors", {n: m.to(torch.uint8) for n, m in masks.items()})
        save_hf(model, out / "model", payload["input"])
        return {"model": str(out / "model"), "masks": str(out / "masks.safetensors"),
                "sparsity": pruning.sparsity(model), "target": target}


class KnowledgeDistiller(_CompressionRole):
    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.compression.distill import distill
        from serialization.checkpoint import load_tensors

        set_threads()
        cfg = payload["cfg"]
        teacher = load_hf(payload["input"])
        student = load_hf(_model_dir(payload, inputs))
        masks_file = _masks_path(inputs)
        masks = {k: v.bool() for k, v in load_tensors(masks_file).items()} if masks_file else None
        metrics = distill(teacher, student, corpus_for(payload), steps=int(cfg["distill_steps"]),
                          lr=float(cfg["distill_lr"]), batch_size=int(cfg["distill_batch_size"]),
                          temperature=float(cfg["temperature"]), alpha=float(cfg["alpha"]),
                          feature_weight=float(cfg["feature_weight"]), seed=int(payload["seed"]), masks=masks)
        out = _task_dir(payload, task)
        save_hf(student, out / "model", payload["input"])
        # The masks pass on from the pruning task: later stages keep the pruned weights at zero.
        return {"model": str(out / "model"), "masks": masks_file, **metrics}


def codec_settings(cfg: dict[str, Any], codec: str) -> dict[str, Any]:
    """The ``compress:`` section's settings of one codec."""
    return {"int4": {"group_size": int(cfg["int4_group_size"])},
            "vptq": {"vector_len": int(cfg["vptq_vector_len"]), "centroids": int(cfg["vptq_centroids"]),
                     "residual_centroids": int(cfg["vptq_residual_centroids"])},
            "seedlm": {"block": int(cfg["seedlm_block"]), "latent": int(cfg["seedlm_latent"]),
                       "seed_bits": int(cfg["seedlm_seed_bits"])}}.get(codec, {})


class QuantizationAgent(_CompressionRole):
    """``quantize-<codec>``: every weight matrix (>= ``min_weights``) of the stage's model in
    ``payload["codec"]``, the rest float16, written as a package. SeedLM gets a time budget: over
    it, :class:`~phases.compression.seedlm.SeedLMTooSlow` fails the task and its declared
    fallback payload (int8) runs instead."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import torch

        from phases.compression.analyze import weight_matrices
        from phases.compression.calibrate import linear_hessians
        from phases.compression.codecs import encode
        from phases.compression.package import save_compressed

        set_threads()
        cfg, codec = payload["cfg"], payload["codec"]
        src = _model_dir(payload, inputs)
        model = load_hf(src)
        matrices = weight_matrices(model, int(cfg["min_weights"]))
        settings = codec_settings(cfg, codec)
        hessians: dict[str, torch.Tensor] = {}
        if codec == "vptq":
            corpus = corpus_for(payload)
            batches = [corpus.batch(i, 4, corpus.config.seq_len, int(payload["seed"]))[:, :-1] for i in range(4)]
            hessians = linear_hessians(model, batches, matrices)
        t0 = time.perf_counter()
        stored = {}
        for name, p in model.state_dict().items():
            w = p.detach()
            if name in matrices:
                s = dict(settings)
                if codec == "vptq" and name in hessians:
                    s["hessian"] = hessians[name]
                if codec == "seedlm":
                    s["max_seconds"] = max(1e-3, float(cfg["seedlm_max_seconds"]) - (time.perf_counter() - t0))
                stored[name] = encode(w, codec, s, sparse=True)
            else:
                stored[name] = encode(w, "fp16")  # norms, biases, gates: too small to pay for a codec
        seconds = time.perf_counter() - t0
        out = _task_dir(payload, task) / "package"
        manifest = save_compressed(out, stored, hf_config=_hf_config(model), copy_files_from=Path(src),
                                   manifest={"codec": codec})
        bits = sum(s.total_bits for s in stored.values())
        return {"package": str(out), "codec": codec, "source": src, "bits": bits, "seconds": seconds,
                "bytes_on_disk": manifest["bytes_on_disk"], "fallback_from": payload.get("fallback_from"),
                "bits_by_weight": {n: stored[n].total_bits for n in matrices}}


def _packages(inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``codec -> quantize output`` of the task's inputs (a SeedLM task that fell back to int8
    duplicates int8: one is kept)."""
    packages: dict[str, dict[str, Any]] = {}
    for k, v in sorted(inputs.items()):
        if k.startswith("quantize-"):
            packages.setdefault(v["codec"], v)
    return packages


def _states(packages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``codec -> decompressed state dict`` of each codec's package."""
    from phases.compression.package import load_state_dict

    return {c: load_state_dict(p["package"]) for c, p in packages.items()}


def _assemble(recipe: dict[str, str], by_codec: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A recipe (codec per matrix) put together from per-codec dicts (decompressed state dicts or
    stored tensors): each matrix from its codec's, the rest from any (they agree: float16)."""
    out = dict(next(iter(by_codec.values())))
    for name, codec in recipe.items():
        out[name] = by_codec[codec][name]
    return out


def _recipe_bits(recipe: dict[str, str], packages: dict[str, dict[str, Any]]) -> int:
    """Stored bits of a recipe: its matrices in their codecs plus everything else (the same in
    every package)."""
    any_pkg = next(iter(packages.values()))
    rest = any_pkg["bits"] - sum(any_pkg["bits_by_weight"].values())
    return rest + sum(packages[c]["bits_by_weight"][n] for n, c in recipe.items())


def _ternary_where_exact(names: list[str], packages: dict[str, Any], state: dict[str, Any]) -> list[dict[str, str]]:
    """With the ternary codec on offer (a BitNet input), one more starting recipe per other
    codec: ternary on the matrices that are exactly ternary (stored losslessly), that codec on
    the rest (embeddings, LM head). Uniform ternary would also quantize those, and a random
    search rarely finds the split across dozens of matrices."""
    from phases.compression.ternary import is_ternary

    if "ternary" not in packages:
        return []
    exact = {n for n in names if n in state and state[n].dim() == 2 and is_ternary(state[n])}
    if not exact or len(exact) == len(names):
        return []
    return [{n: "ternary" if n in exact else c for n in names} for c in packages if c != "ternary"]


class ArchitectureOptimizer(_CompressionRole):
    """``search``: one codec per weight matrix, NSGA-II (optuna) over retention and compression
    vs the fp32 input, each recipe assembled from the codec packages and measured on held-out
    data; the choice is the front's best 0.4 compression / 0.6 retention score that passes the
    gate's retention."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.compression.search import search_recipes

        set_threads()
        cfg = payload["cfg"]
        packages = _packages(inputs)
        names = sorted(next(iter(packages.values()))["bits_by_weight"])
        reference = load_hf(payload["input"])
        ref_quality = quality_of(reference, payload)
        fp32_bits = 32 * sum(p.numel() for p in reference.state_dict().values())
        skeleton = load_hf(next(iter(packages.values()))["source"])
        states = _states(packages)

        def evaluate(recipe: dict[str, str]) -> dict[str, Any]:
            skeleton.load_state_dict(_assemble(recipe, states))
            q = quality_of(skeleton, payload)
            bits = _recipe_bits(recipe, packages)
            return {"retention": q.token_accuracy / ref_quality.token_accuracy, "compression": fp32_bits / bits,
                    "bits": bits, "perplexity": q.perplexity, "token_accuracy": q.token_accuracy}

        uniform = [{n: c for n in names} for c in packages]
        initial = uniform + _ternary_where_exact(names, packages, reference.state_dict())
        result = search_recipes({n: list(packages) for n in names}, evaluate, trials=int(cfg["search_trials"]),
                                seed=int(payload["seed"]), initial=initial)
        choice = result.choose(weights=(float(cfg["weight_compression"]), float(cfg["weight_retention"])),
                               min_retention=float(cfg["min_retention"]))
        path = _task_dir(payload, task) / "search.json"
        atomic_write_json(path, {**result.to_json(), "choice": choice.to_json(), "reference": ref_quality.to_json(),
                                 "fp32_bits": fp32_bits})
        chosen = {"recipe": choice.trial.recipe, "metrics": choice.trial.metrics, "score": choice.score,
                  "index": choice.index}
        return {"search": str(path), "chosen": chosen, "gate_met_in_search": choice.gate_met,
                "front": [result.trials[i].to_json() for i in result.front],
                "uniform": {c: result.trials[i].to_json() for i, c in enumerate(packages)},
                "trials": len(result.trials), "reference": ref_quality.to_json(), "fp32_bits": fp32_bits}


class CompressionValidator(_CompressionRole):
    """``validate``: the chosen recipe re-measured with the held-out tasks too, output parity vs
    the input model, and the quality gate's verdict."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.compression.evaluate import QualityGate, output_parity, retention

        set_threads()
        cfg = payload["cfg"]
        search = inputs["search"]
        packages = _packages(inputs)
        reference = load_hf(payload["input"])
        candidate = load_hf(next(iter(packages.values()))["source"])
        candidate.load_state_dict(_assemble(search["chosen"]["recipe"], _states(packages)))
        ref_q, cand_q = quality_of(reference, payload, tasks=True), quality_of(candidate, payload, tasks=True)
        ret = retention(cand_q, ref_q)
        windows = corpus_for(payload).windows("heldout", max_windows=int(payload["eval"]["batch_size"]))[:, :-1]
        parity = output_parity(reference, candidate, windows)
        gate = QualityGate(min_retention=float(cfg["min_retention"]), max_perplexity_ratio=cfg["max_perplexity_ratio"])
        passed, reasons = gate.verdict(ret, parity)
        return {"passed": passed, "reasons": reasons, **ret, "parity": parity,
                "reference": ref_q.to_json(), "candidate": cand_q.to_json()}


class DeploymentPackager(_CompressionRole):
    """``package``: the chosen recipe's stored tensors gathered from the codec packages into the
    phase's model (``payload["out"]``), reloaded through the package and checked against the
    validated candidate; ONNX export with onnxruntime parity; TensorRT and mobile statuses."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        import torch

        from phases.compression import export
        from phases.compression.package import load_model, load_stored, save_compressed

        set_threads()
        search = inputs["search"]
        recipe = search["chosen"]["recipe"]
        packages = _packages(inputs)
        stored = _assemble(recipe, {c: load_stored(p["package"]) for c, p in packages.items()})
        src = next(iter(packages.values()))["source"]
        skeleton = load_hf(src)
        out = Path(payload["out"])
        manifest = save_compressed(out, stored, hf_config=_hf_config(skeleton), copy_files_from=Path(src),
                                   manifest={"recipe": recipe, "strategy": payload["cfg"]["strategy"]})
        model = load_model(out)
        windows = corpus_for(payload).windows("heldout", max_windows=4)[:, :-1]
        skeleton.load_state_dict(_assemble(recipe, _states(packages)))
        with torch.no_grad():
            same = bool(torch.equal(model(input_ids=windows).logits, skeleton(input_ids=windows).logits))
        result: dict[str, Any] = {"model": str(out), "bytes_on_disk": manifest["bytes_on_disk"],
                                  "bits": manifest.get("total_bits"), "reload_equals_candidate": same,
                                  "tensorrt": export.tensorrt_status(),
                                  "mobile": {t: export.mobile_status(t) for t in export.MOBILE_TARGETS}}
        if payload["cfg"]["onnx"]:
            onnx_dir = Path(payload["work"]) / task
            onnx_dir.mkdir(parents=True, exist_ok=True)
            path = export.export_onnx(model, onnx_dir / "model.onnx", seq_len=windows.shape[1])
            int8 = export.quantize_onnx_int8(path, onnx_dir / "model.int8.onnx")
            result["onnx"] = {"path": str(path), "bytes": path.stat().st_size,
                              "parity": export.onnx_parity(model, path, windows),
                              "int8_path": str(int8), "int8_bytes": int8.stat().st_size}
        return result


class PerformanceProfiler(_CompressionRole):
    """``profile``: the input model, every codec's uniform candidate, every Pareto-front
    candidate (each packaged here, under this task's folder, and loaded back through its package)
    and the phase's packaged model, profiled in this process one after another, on the same
    inputs."""

    def handle(self, task: str, payload: Any, inputs: dict[str, Any]) -> Any:
        from phases.compression.package import load_model, load_stored, save_compressed
        from phases.compression.profile import bytes_on_disk, compare, profile_model

        set_threads()
        cfg = payload["cfg"]
        windows = corpus_for(payload).windows("heldout", max_windows=int(cfg["profile_batch_size"]))[:, :-1]
        models = {"input": (load_hf(payload["input"]), payload["input"])}
        packages = _packages(inputs)
        for codec, v in packages.items():
            models[f"uniform-{codec}"] = (load_model(v["package"]), v["package"])
        stored_by_codec = {c: load_stored(p["package"]) for c, p in packages.items()}
        hf_config = _hf_config(models[f"uniform-{next(iter(packages))}"][0])  # the stage model's shape
        for trial in inputs["search"]["front"]:
            out = _task_dir(payload, task) / f"front-{trial['number']:03d}"
            save_compressed(out, _assemble(trial["recipe"], stored_by_codec), hf_config=hf_config,
                            manifest={"recipe": trial["recipe"], "trial": trial["number"]})
            models[f"front-{trial['number']:03d}"] = (load_model(out), out)
        models["compressed"] = (load_model(inputs["package"]["model"]), inputs["package"]["model"])
        profiles = {name: profile_model(model, windows, repeats=int(cfg["profile_repeats"]))
                    for name, (model, _) in models.items()}
        ratios = compare(profiles, "input")
        return {name: {**p.to_json(), "bytes_on_disk": bytes_on_disk(models[name][1]), **ratios.get(name, {})}
                for name, p in profiles.items()}
