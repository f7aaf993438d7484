"""Phase 2 driver: EvoMerge on Ray Tune. One Tune trial per candidate merge, a resumable GA.

1. The input models (and the common ancestor the upstream phase names, the base of
   task-vector merges) are measured once in a Ray task: their objectives fix the fitness
   reference (:func:`phases.evomerge.fitness.reference`), and their fitness seeds the cache, so
   the parents' own genomes are never re-evaluated.
2. :func:`coordinator.drivers.evomerge_tune.run_search` runs the GA: each candidate is a Tune
   trial with the declared resources (``evomerge.cpus_per_trial``, ``gpus_per_trial``), so a
   bigger cluster runs more trials at once with no change. After every generation the GA's
   state (recipes, fitness cache, random state, lineage; never weights) is written to
   ``work/evolution.json``; a resumed run continues from the last completed generation and
   ends with the same best genome as an uninterrupted one.
3. The best recipe is merged once more in a Ray task and written as an HF model dir
   (``models/best``), with the per-generation history (``history.jsonl``, the ``evomerge/*``
   metrics), the recipe (``recipe.json``, exact; ``recipe.yaml``, mergekit-style) and the best
   model's lineage (``lineage.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from coordinator.errors import PhaseError
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from phases.evomerge.config import EvoMergeConfig
from phases.evomerge.evolution import Evolution, EvolutionConfig, GenerationRecord, parent_genome
from phases.evomerge.fitness import Objectives, composite, reference
from phases.evomerge.genome import Genome, layer_group
from phases.evomerge.steady import SteadyState
from serialization.checkpoint import atomic_write_json, atomic_write_text

__all__ = ["run_evomerge", "recipe_yaml"]

log = logging.getLogger("agentforge")
STATE_FILE = "evolution.json"
TASK_VECTOR = ("task_arithmetic", "ties", "dare_ties", "dare_linear")  # the base's own weight is unused


def _parents(inputs: PhaseInputs, cfg: EvoMergeConfig) -> tuple[list[Path], int, int]:
    """(models to merge, index of the base, index of the first input model among them)."""
    models = list(inputs.models)
    if cfg.base == "auto":
        ancestor = inputs.artifacts.get("base_model")
        if ancestor is not None and (Path(ancestor) / "config.json").exists() and ancestor not in models:
            return [Path(ancestor), *models], 0, 1
        return models, 0, 0
    if cfg.base == "first":
        return models, 0, 0
    if not 0 <= cfg.base < len(models):
        raise PhaseError("evomerge", f"evomerge.base is {cfg.base}, but there are {len(models)} input models "
                                     f"(indices 0..{len(models) - 1})")
    return models, int(cfg.base), 0


def _measure_task(setup: dict) -> dict[str, Any]:
    from coordinator.drivers.evomerge_trial import measure_parents

    return measure_parents(setup)


def _materialize_task(genome: dict, setup: dict, out_dir: str, tokenizer_from: str) -> dict[str, Any]:
    from coordinator.drivers.evomerge_trial import materialize

    return materialize(genome, setup, out_dir, tokenizer_from)


def _fingerprint(cfg: EvoMergeConfig, inputs: PhaseInputs, models: list[Path], setup: dict) -> str:
    """What a checkpoint must agree with to be continued: the search's settings (not where trials
    run), the input models' hashes, the evaluation data and the seed."""
    search = cfg.model_dump(mode="json", exclude={"max_concurrent", "max_failures", "resubmits", "gpus_per_trial"})
    parts = {"search": search, "inputs": [r.sha256 for r in inputs.refs], "models": [str(m) for m in models],
             "data": setup["data"], "seed": setup["seed"], "eval": setup["eval"], "threads": setup["threads"]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _patience_left(history: list[GenerationRecord], upto: int, patience: int) -> int:
    """Generations left before early stopping, after generation ``upto`` (best so far improving
    resets it), as the reference's ``evomerge/convergence_patience``."""
    best, stale = float("-inf"), 0
    for rec in history[: upto + 1]:
        if rec.best_fitness > best + 1e-12:
            best, stale = rec.best_fitness, 0
        else:
            stale += 1
    return patience - stale


def _generation_row(rec: GenerationRecord, evo: Evolution, details: dict, failed: int) -> dict[str, Any]:
    best = details.get(rec.best_key, {})
    row: dict[str, Any] = {
        "evomerge/generation": rec.generation,
        "evomerge/convergence_patience": _patience_left(evo.history, rec.generation, evo.cfg.patience),
        "evomerge/best_fitness": rec.best_fitness,
        "evomerge/avg_fitness": rec.mean_fitness,
        "evomerge/diversity": rec.diversity,
        "evomerge/evaluated": rec.evaluated,
        "evomerge/immigrants": rec.immigrants,
        "evomerge/failed_trials": failed,
    }
    for name in ("perplexity", "accuracy", "flops_per_token", "weight_bytes"):
        if f"objectives/{name}" in best:
            row[f"evomerge/{name}"] = best[f"objectives/{name}"]
    for name in ("perplexity", "accuracy", "speed", "memory"):
        if f"terms/{name}" in best:
            row[f"evomerge/term_{name}"] = best[f"terms/{name}"]
    return row


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


@register_phase("evomerge", number=2, title="EvoMerge: evolutionary merging", consumes="models")
def run_evomerge(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    import ray
    from ray import tune

    from coordinator.drivers.evomerge_trial import trial
    from coordinator.drivers.evomerge_tune import run_search

    cfg: EvoMergeConfig = ctx.config.evomerge
    models, base, first_input = _parents(inputs, cfg)
    if len(models) < 2:
        raise PhaseError("evomerge", f"merging needs at least two models, got {len(models)}")
    threads = max(1, int(cfg.cpus_per_trial))
    setup: dict[str, Any] = {
        "parents": [str(m) for m in models], "data": ctx.config.data.model_dump(mode="json"), "seed": ctx.seed,
        "eval": {"batch_size": cfg.eval_batch_size, "max_batches": cfg.eval_batches, "tasks": cfg.eval_tasks},
        "threads": threads,
    }
    fingerprint = _fingerprint(cfg, inputs, models, setup)
    state_path = ctx.work_dir / STATE_FILE
    saved = json.loads(state_path.read_text()) if state_path.exists() else None
    if saved is not None and saved.get("fingerprint") != fingerprint:
        log.warning("evomerge: %s belongs to other settings or inputs; the search starts over", state_path)
        saved = None

    opts: dict[str, Any] = {"num_cpus": cfg.cpus_per_trial, "max_retries": 2}
    if cfg.gpus_per_trial:
        opts["num_gpus"] = min(1.0, cfg.gpus_per_trial)
    if saved is not None:
        measured = saved["measured"]
    else:
        t0 = time.perf_counter()
        measured = ray.get(ray.remote(_measure_task).options(name="evomerge.parents", **opts).remote(setup))
        log.info("evomerge: %d input models measured in %.1f s", len(models), time.perf_counter() - t0)
    objectives = measured["objectives"]
    ref = reference([Objectives(**o) for o in objectives[first_input:]])
    setup["reference"] = ref.to_json()

    evo_cfg = EvolutionConfig(**{k: getattr(cfg, k) for k in EvolutionConfig.model_fields})
    if cfg.mode == "continuous":
        evo: Evolution = SteadyState(evo_cfg, n_models=len(models), seed=ctx.seed, base=base,
                                     layers=int(measured["layers"]), window=cfg.window or cfg.population)
    else:
        evo = Evolution(evo_cfg, n_models=len(models), seed=ctx.seed, base=base, layers=int(measured["layers"]))
    details: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    if saved is not None:
        evo.load_state_dict(saved["evolution"])
        details, failed = saved["details"], list(saved.get("failed", []))
        log.info("evomerge: resuming after generation %d (%d genomes evaluated)", evo.generation - 1, len(evo.cache))
        for rec in evo.history:  # the resumed tracker run gets the whole history
            ctx.log(_generation_row(rec, evo, details, 0), rec.generation)
    else:
        if isinstance(evo, SteadyState):
            evo.start()
        else:
            evo.initial()
        for i, obj in enumerate(objectives):  # the parents' genomes reproduce them: no trial needed
            fit, terms = composite(Objectives(**obj), ref)
            key = parent_genome(i, len(models), evo_cfg.groups, base, evo.identity).key()
            evo.cache[key] = fit
            details[key] = {**{f"objectives/{k}": float(v) for k, v in obj.items()},
                            **{f"terms/{k}": v for k, v in terms.items()}}

    searcher_ref: list[Any] = []

    def checkpoint() -> None:
        now_failed = sorted(set(failed) | set(searcher_ref[0].failed if searcher_ref else []))
        atomic_write_json(state_path, {"fingerprint": fingerprint, "measured": measured,
                                       "evolution": evo.state_dict(), "details": details, "failed": now_failed})

    def on_generation(rec: GenerationRecord) -> None:
        n_failed = len(set(failed) | set(searcher_ref[0].failed if searcher_ref else []))
        ctx.log(_generation_row(rec, evo, details, n_failed), rec.generation)
        checkpoint()
        ctx.progress("generations", min(evo.generation, cfg.max_generations), cfg.max_generations)
        log.info("evomerge: generation %d: best %.4f, mean %.4f, diversity %.3f, %d evaluated", rec.generation,
                 rec.best_fitness, rec.mean_fitness, rec.diversity, rec.evaluated)

    if not evo.done:
        resources: dict[str, float] = {"cpu": cfg.cpus_per_trial}
        if cfg.gpus_per_trial:
            resources["gpu"] = cfg.gpus_per_trial
        t0 = time.perf_counter()
        _, _, searcher = run_search(
            tune.with_parameters(trial, setup=setup), evo, storage_path=ctx.work_dir / "tune",
            name=f"from-generation-{evo.generation:03d}", resources=resources, max_concurrent=cfg.max_concurrent,
            max_failures=cfg.max_failures, resubmits=cfg.resubmits, on_generation=on_generation, details=details,
            on_searcher=searcher_ref.append)
        failed.extend(k for k in searcher.failed if k not in failed)
        checkpoint()
        log.info("evomerge: search done in %.1f s: %d generations, %d genomes evaluated, %d failed",
                 time.perf_counter() - t0, evo.generation, len(evo.cache), len(failed))
    if evo.best is None:
        raise PhaseError("evomerge", "the search ended before any generation closed")

    best = evo.best
    out_dir = ctx.phase_dir / "models" / "best"
    t0 = time.perf_counter()
    final = ray.get(ray.remote(_materialize_task).options(name="evomerge.best", **opts).remote(
        best.to_json(), setup, str(out_dir), str(inputs.models[0])))
    log.info("evomerge: best recipe merged and written in %.1f s", time.perf_counter() - t0)
    if abs(final["fitness"] - evo.best_fitness) > 1e-9 * max(1.0, abs(evo.best_fitness)):
        log.warning("evomerge: the best recipe re-merged scores %.9f, in the search %.9f (not deterministic?)",
                    final["fitness"], evo.best_fitness)

    parent_fit = [evo.cache[parent_genome(i, len(models), evo_cfg.groups, base, evo.identity).key()]
                  for i in range(len(models))]
    inputs_fit = parent_fit[first_input:]
    best_parent = max(inputs_fit)
    gain = (evo.best_fitness - best_parent) / abs(best_parent) if best_parent else float("nan")
    names = [m.name if i >= first_input else f"{m.name} (base)" for i, m in enumerate(models)]

    history = ctx.phase_dir / "history.jsonl"
    atomic_write_text(history, "".join(json.dumps(_json_row(_generation_row(r, evo, details, 0)), sort_keys=True) + "\n"
                                       for r in evo.history))
    # Paths inside the run folder are written relative to this phase's folder, so the files
    # (and their hashes) do not depend on where the run folder lives.
    shown = [Path(os.path.relpath(m, ctx.phase_dir)) if Path(m).resolve().is_relative_to(ctx.run.root.resolve())
             else Path(m) for m in models]
    recipe = ctx.phase_dir / "recipe.json"
    atomic_write_json(recipe, {"genome": best.to_json(), "key": best.key(), "fitness": evo.best_fitness,
                               "models": [str(m) for m in shown], "paths_relative_to": "this file's folder",
                               "model_names": names,
                               "num_layers": _num_layers(models[0]), "groups": evo_cfg.groups})
    recipe_y = ctx.phase_dir / "recipe.yaml"
    atomic_write_text(recipe_y, recipe_yaml(best, shown, _num_layers(models[0]), fitness=evo.best_fitness,
                                            generation=evo.generation, stack=evo.layers))
    lineage = ctx.phase_dir / "lineage.json"
    atomic_write_json(lineage, {"best": best.key(), "models": names, "nodes": evo.ancestry(best.key())})

    metrics: dict[str, Any] = {
        "evomerge/best_fitness": evo.best_fitness,
        "evomerge/best_fitness_remerged": final["fitness"],
        "evomerge/best_parent_fitness": best_parent,
        "evomerge/gain_over_best_parent": gain,
        "evomerge/generations": evo.generation,
        "evomerge/final_diversity": evo.history[-1].diversity if evo.history else 0.0,
        "evomerge/trials": sum(r.evaluated for r in evo.history),
        "evomerge/failed_trials": len(failed),
        # candidates that ran but scored no finite fitness (e.g. linear with all weights 0:
        # mergekit's normalisation divides by zero), counted from the fitness cache
        "evomerge/invalid_candidates": sum(1 for k, v in evo.cache.items() if v == float("-inf") and k not in failed),
        "evomerge/best_method": best.method,
        "evomerge/perplexity": final["objectives/perplexity"],
        "evomerge/accuracy": final["objectives/accuracy"],
    }
    for i, f in enumerate(parent_fit):
        metrics[f"evomerge/parent_fitness/{names[i]}"] = f
    return PhaseOutput(models=[out_dir], metrics=metrics,
                       artifacts={"history": history, "recipe": recipe, "recipe_yaml": recipe_y, "lineage": lineage})


def _num_layers(model_dir: Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("num_hidden_layers", 1))


def recipe_yaml(genome: Genome, models: list[Path], num_layers: int, *, fitness: float, generation: int,
                stack: int = 0) -> str:
    """The recipe in mergekit's config style: one slice per layer group (its layer range and the
    group's per-model parameters), and the parameters of tensors outside the layers (embeddings,
    final norm, head) under ``parameters`` with mergekit's ``filter`` conditions.

    ``recipe.json`` is the exact form (``phases.evomerge.merge`` replays it); this file is for
    reading and for porting the recipe to mergekit on an architecture mergekit knows.
    """
    import yaml

    groups = genome.groups
    slices = []
    for g in range(groups):
        layers = [i for i in range(num_layers) if layer_group(f"layers.{i}.", num_layers, groups) == g]
        if not layers:
            continue
        params = genome.parameters_for(g)
        sources = []
        for m, path in enumerate(models):
            src: dict[str, Any] = {"model": str(path), "layer_range": [layers[0], layers[-1] + 1]}
            per_model = {k: v[m] for k, v in params.items() if isinstance(v, list)}
            if per_model and not (m == genome.base and genome.method in TASK_VECTOR):
                src["parameters"] = per_model
            sources.append(src)
        entry: dict[str, Any] = {"sources": sources}
        if genome.method == "slerp":
            entry["parameters"] = {"t": params["t"]}
        slices.append(entry)
    rest = genome.parameters_for(groups)
    doc: dict[str, Any] = {"merge_method": genome.method, "dtype": "float32", "slices": slices}
    if genome.method in (*TASK_VECTOR, "slerp"):
        doc["base_model"] = str(models[genome.base])
    doc["parameters"] = {k: [{"filter": "embed_tokens|norm|lm_head|act|memory", "value": v}] for k, v in rest.items()}
    doc["config_from"] = str(models[genome.config_from])  # not a mergekit key: the child's config source
    if genome.layout:
        # Not a mergekit key either: the DFS layer path over the merge above ("merge") and the
        # models, applied after it (mergekit has no data-flow merging).
        from phases.evomerge.layout import path_from_bits

        path = path_from_bits(genome.layout, len(models) + 1, stack)
        doc["layer_path"] = [{"model": "merge" if src == 0 else str(models[src - 1]), "layer": layer}
                             for src, layer in path]
    header = (f"# EvoMerge best recipe: fitness {fitness:.6f} after {generation} generation(s).\n"
              "# mergekit-style (slices per layer group); recipe.json is the exact recipe.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
