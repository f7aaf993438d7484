"""Phase 3 driver: Quiet-STaR on Ray. One task trains thoughts into the input model, or, with
``quietstar.workers`` > 1, a Ray Train worker group trains it data-parallel.

Training checkpoints into ``RUN/03_quietstar/work/train/`` and resumes from there, so a task
retried by Ray after a worker crash, a worker group restarted by Ray Train
(``FailureConfig(max_failures=2)``), or a resumed pipeline continues where it stopped and ends
with bit-identical weights. Torch's intra-op threads are pinned to each worker's CPUs so results
do not depend on the size of the machine. The sample thoughts go to W&B and the report as the
table ``thought_examples`` and to ``quietstar_thought_examples.json`` (the reference's name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.drivers.ray_tasks import HistoryWriter, wait_training
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json, read_json

__all__ = ["run_quietstar"]

_FINAL = "final.json"  # worker 0's result in the data-parallel case (Ray Train returns no values)


def _train_task(model_dir: str, quietstar: dict, data: dict, seed: int, work_dir: str, out_dir: str,
                threads: int, rank: int = 0, world_size: int = 1) -> dict[str, Any] | None:
    import torch

    from phases.data import DataConfig, load_corpus
    from phases.quietstar.config import QuietStarConfig
    from phases.quietstar.train import train_quietstar

    torch.set_num_threads(threads)
    cfg = QuietStarConfig.model_validate(quietstar)
    corpus = load_corpus(DataConfig.model_validate(data), seed)
    log = HistoryWriter(Path(work_dir) / "history.jsonl")
    device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    return train_quietstar(Path(model_dir), cfg, corpus, seed=seed, work_dir=Path(work_dir), out_dir=Path(out_dir),
                           log=log, device=device, rank=rank, world_size=world_size)


def _train_worker(config: dict) -> None:
    """One Ray Train worker: its rank's share of every batch; worker 0 writes the result."""
    import ray.train

    context = ray.train.get_context()
    result = _train_task(**config["task"], rank=context.get_world_rank(), world_size=context.get_world_size())
    if result is not None:
        atomic_write_json(Path(config["task"]["work_dir"]) / _FINAL, result)


def _data_parallel_task(task: dict, workers: int, cpus: int, gpus: float, storage: str) -> dict[str, Any]:
    """Run the Ray Train worker group to the end (this task itself holds no CPU)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    final = Path(task["work_dir"]) / _FINAL
    final.unlink(missing_ok=True)
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"task": task},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name="quietstar", storage_path=storage, failure_config=FailureConfig(max_failures=2)))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return read_json(final)


@register_phase("quietstar", number=3, title="Quiet-STaR: thought tokens", consumes="model")
def run_quietstar(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    import ray

    (model_dir,) = inputs.models
    cfg = ctx.config.quietstar
    cpus = ctx.config.ray.cpus_per_task
    work, out_dir = ctx.work_dir / "train", ctx.phase_dir / "models" / "quietstar"
    task = {"model_dir": str(model_dir), "quietstar": cfg.model_dump(mode="json"),
            "data": ctx.config.data.model_dump(mode="json"), "seed": ctx.seed, "work_dir": str(work),
            "out_dir": str(out_dir), "threads": cpus}
    if cfg.workers == 1:
        # Ray retries a task whose worker died (max_retries); the task resumes from its checkpoint.
        ref = ray.remote(_train_task).options(name="quietstar.train", num_cpus=cpus, num_gpus=cfg.gpus_per_worker,
                                              max_retries=2).remote(**task)
    else:
        ref = ray.remote(_data_parallel_task).options(name="quietstar.train", num_cpus=0, max_retries=0).remote(
            task, cfg.workers, cpus, cfg.gpus_per_worker, str((ctx.work_dir / "ray_train").resolve()))
    result = wait_training(ref, work / "history.jsonl", cfg.steps, ctx)
    examples = ctx.phase_dir / "quietstar_thought_examples.json"
    atomic_write_json(examples, result["samples"])
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=result["metrics"],
                       artifacts={"thought_examples": examples},
                       tables={"thought_examples": result["samples"]} if result["samples"] else {})
