"""Phase 5 driver: Forge training on Ray. One Ray task trains the input model
(``phases.forge.train.train_forge``): the four-stage curriculum with Grokfast, edge-of-chaos task
difficulty, dream cycles and self-modeling, as configured.

Training checkpoints into ``RUN/05_forge/work/train/`` and resumes from there, so a task retried
by Ray after a worker crash, or a resumed pipeline, continues where it stopped and ends with
bit-identical weights. Torch's intra-op threads are pinned to the task's CPUs.

Outputs: the trained model ``models/forge`` (a BitNet input stays BitNet: its ternary layers are
exported as phase 4 exports them); the artifact ``forge_training_summary.json`` (the reference's
name: per-step records, validations, stage boundaries, data statistics; a function of the config
and seed); the measured throughput, memory and disk use in ``timings.json`` beside it and in the
metrics, never in a hashed artifact; the table ``validations`` (step, val loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.drivers.ray_tasks import HistoryWriter, wait_training
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json

__all__ = ["run_forge"]


def _train_task(model_dir: str, forge: dict, data: dict, seed: int, work_dir: str, out_dir: str, threads: int,
                device: str) -> dict[str, Any]:
    import torch

    from phases.data import DataConfig, load_corpus
    from phases.forge.config import ForgeConfig
    from phases.forge.train import train_forge

    torch.set_num_threads(threads)
    cfg = ForgeConfig.model_validate(forge)
    corpus = load_corpus(DataConfig.model_validate(data), seed)
    log = HistoryWriter(Path(work_dir) / "history.jsonl")
    return train_forge(Path(model_dir), cfg, corpus, seed=seed, work_dir=Path(work_dir), out_dir=Path(out_dir),
                       log=log, device=device)


@register_phase("forge", number=5, title="Forge training: Grokfast and curriculum", consumes="model")
def run_forge(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    import ray

    (model_dir,) = inputs.models
    cfg = ctx.config.forge
    cpus = ctx.config.ray.cpus_per_task
    work = ctx.work_dir / "train"
    out_dir = ctx.phase_dir / "models" / "forge"
    task = {"model_dir": str(model_dir), "forge": cfg.model_dump(mode="json"),
            "data": ctx.config.data.model_dump(mode="json"), "seed": ctx.seed, "work_dir": str(work),
            "out_dir": str(out_dir), "threads": cpus, "device": "cuda" if cfg.gpus > 0 else "cpu"}
    # Ray retries a task whose worker died (max_retries); the task resumes from its checkpoint.
    ref = ray.remote(_train_task).options(name="forge.train", num_cpus=cpus, num_gpus=cfg.gpus,
                                          max_retries=2).remote(**task)
    result = wait_training(ref, work / "history.jsonl", cfg.steps, ctx)
    summary = ctx.phase_dir / "forge_training_summary.json"
    atomic_write_json(summary, result["report"])
    atomic_write_json(ctx.phase_dir / "timings.json", result["timings"])  # measured: not an artifact
    validations = [{"step": int(step), "val_loss": loss} for step, loss in result["report"]["validations"]]
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=result["metrics"],
                       artifacts={"training_summary": summary}, tables={"validations": validations})
