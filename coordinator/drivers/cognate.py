"""Phase 1 driver: Cognate on Ray. One task for the shared warm-up, then one task per variant.

The three variants share one initialisation and one warm-up (the base model that task-vector
merges subtract in phase 2), then specialise in parallel as independent Ray tasks with declared
CPUs. Each task checkpoints into ``RUN/01_cognate/work/<name>/`` and resumes from there, so a
task retried by Ray after a worker crash, or a resumed pipeline, continues where it stopped
and ends with bit-identical weights. Torch's intra-op threads are pinned to the task's CPUs
so results do not depend on the size of the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.drivers.ray_tasks import HistoryWriter, read_history, wait_all
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json

__all__ = ["run_cognate"]


def _warmup_task(cognate: dict, data: dict, seed: int, work_dir: str, out_dir: str, threads: int) -> str:
    import torch

    from phases.cognate import CognateConfig, warmup
    from phases.data import DataConfig, load_corpus

    torch.set_num_threads(threads)
    cfg = CognateConfig.model_validate(cognate)
    corpus = load_corpus(DataConfig.model_validate(data), seed)
    log = HistoryWriter(Path(work_dir) / "history.jsonl")
    return str(warmup(cfg, corpus, seed=seed, work_dir=Path(work_dir), out_dir=Path(out_dir), log=log))


def _specialize_task(
    variant: str, base_dir: str, cognate: dict, data: dict, seed: int, work_dir: str, out_dir: str, threads: int
) -> dict[str, Any]:
    import torch

    from phases.cognate import CognateConfig, specialize
    from phases.data import DataConfig, load_corpus

    torch.set_num_threads(threads)
    cfg = CognateConfig.model_validate(cognate)
    corpus = load_corpus(DataConfig.model_validate(data), seed)
    log = HistoryWriter(Path(work_dir) / "history.jsonl")
    return specialize(variant, Path(base_dir), cfg, corpus, seed=seed, work_dir=Path(work_dir),
                      out_dir=Path(out_dir), log=log)


@register_phase("cognate", number=1, title="Cognate: a new model family", consumes="none")
def run_cognate(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    import ray

    cfg = ctx.config
    variants = list(cfg.cognate.variants)
    cognate, data = cfg.cognate.model_dump(mode="json"), cfg.data.model_dump(mode="json")
    cpus = cfg.ray.cpus_per_task
    models_dir = ctx.phase_dir / "models"
    # Ray retries a task whose worker died (max_retries); the task resumes from its checkpoint.
    opts = dict(num_cpus=cpus, max_retries=2)

    base_dir, base_work = models_dir / "base", ctx.work_dir / "warmup"
    ref = ray.remote(_warmup_task).options(name="cognate.warmup", **opts).remote(
        cognate, data, ctx.seed, str(base_work), str(base_dir), cpus)
    wait_all({"warm-up": ref}, histories={"warm-up": base_work / "history.jsonl"},
             total_steps={"warm-up": cfg.cognate.warmup_steps}, progress=ctx.progress)

    refs, histories, totals = {}, {}, {}
    for variant in variants:
        work = ctx.work_dir / variant
        refs[variant] = ray.remote(_specialize_task).options(name=f"cognate.{variant}", **opts).remote(
            variant, str(base_dir), cognate, data, ctx.seed, str(work), str(models_dir / variant), cpus)
        histories[variant], totals[variant] = work / "history.jsonl", cfg.cognate.steps
    results = wait_all(refs, histories=histories, total_steps=totals, progress=ctx.progress)

    _log_histories(ctx, base_work / "history.jsonl", histories)
    metrics: dict[str, Any] = {}
    for variant in variants:
        for key, value in results[variant].items():
            metrics[f"{variant}/{key}"] = value
    first = results[variants[0]]
    for key in ("model/total_params", "model/trainable_params"):
        if key in first:
            metrics[key] = first[key]
    summary = ctx.phase_dir / "cognate_models_summary.json"
    atomic_write_json(summary, {"variants": variants, "metrics": {v: results[v] for v in variants}})
    return PhaseOutput(
        models=[models_dir / v for v in variants],
        metrics=metrics,
        artifacts={"base_model": base_dir, "summary": summary},
    )


def _log_histories(ctx: PhaseContext, warmup_history: Path, histories: dict[str, Path]) -> None:
    """Send the tasks' step histories to the tracker: warm-up steps first, then the variants side by side."""
    warm = read_history(warmup_history)
    for row in warm:
        ctx.log({(k if k.startswith("warmup/") else f"warmup/{k}"): v for k, v in row.items() if k != "step"},
                row["step"])
    offset = warm[-1]["step"] + 1 if warm else 0
    merged: dict[int, dict[str, Any]] = {}
    for variant, path in histories.items():
        for row in read_history(path):
            merged.setdefault(row["step"], {}).update({f"{variant}/{k}": v for k, v in row.items() if k != "step"})
    for step in sorted(merged):
        ctx.log(merged[step], offset + step)
