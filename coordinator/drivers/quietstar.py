"""Phase 3 driver: Quiet-STaR on Ray. One task trains thoughts into the input model.

The task checkpoints into ``RUN/03_quietstar/work/train/`` and resumes from there, so a task
retried by Ray after a worker crash, or a resumed pipeline, continues where it stopped and ends
with bit-identical weights. Torch's intra-op threads are pinned to the task's CPUs so results
do not depend on the size of the machine. The sample thoughts go to W&B and the report as the
table ``thought_examples`` and to ``quietstar_thought_examples.json`` (the reference's name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.drivers.ray_tasks import HistoryWriter, read_history, wait_all
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json

__all__ = ["run_quietstar"]


def _train_task(model_dir: str, quietstar: dict, data: dict, seed: int, work_dir: str, out_dir: str,
                threads: int) -> dict[str, Any]:
    import torch

    from phases.data import DataConfig, load_corpus
    from phases.quietstar.config import QuietStarConfig
    from phases.quietstar.train import train_quietstar

    torch.set_num_threads(threads)
    cfg = QuietStarConfig.model_validate(quietstar)
    corpus = load_corpus(DataConfig.model_validate(data), seed)
    log = HistoryWriter(Path(work_dir) / "history.jsonl")
    return train_quietstar(Path(model_dir), cfg, corpus, seed=seed, work_dir=Path(work_dir), out_dir=Path(out_dir),
                           log=log)


@register_phase("quietstar", number=3, title="Quiet-STaR: thought tokens", consumes="model")
def run_quietstar(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    import ray

    (model_dir,) = inputs.models
    cfg = ctx.config.quietstar
    cpus = ctx.config.ray.cpus_per_task
    work, out_dir = ctx.work_dir / "train", ctx.phase_dir / "models" / "quietstar"
    # Ray retries a task whose worker died (max_retries); the task resumes from its checkpoint.
    ref = ray.remote(_train_task).options(name="quietstar.train", num_cpus=cpus, max_retries=2).remote(
        str(model_dir), cfg.model_dump(mode="json"), ctx.config.data.model_dump(mode="json"), ctx.seed, str(work),
        str(out_dir), cpus)
    history = work / "history.jsonl"
    result = wait_all({"train": ref}, histories={"train": history}, total_steps={"train": cfg.steps},
                      progress=ctx.progress)["train"]
    for row in read_history(history):
        ctx.log({k: v for k, v in row.items() if k != "step"}, row["step"])
    examples = ctx.phase_dir / "quietstar_thought_examples.json"
    atomic_write_json(examples, result["samples"])
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=result["metrics"],
                       artifacts={"thought_examples": examples},
                       tables={"thought_examples": result["samples"]} if result["samples"] else {})
