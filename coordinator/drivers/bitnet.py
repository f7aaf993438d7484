"""Phase 4 driver: BitNet b1.58 on Ray. One Ray task calibrates, quantizes, fine-tunes (QAT)
and stores the input model (``phases.bitnet.train.train_bitnet``).

QAT checkpoints into ``RUN/04_bitnet/work/train/`` and resumes from there, so a task retried by
Ray after a worker crash, or a resumed pipeline, continues where it stopped and ends with
bit-identical weights. Torch's intra-op threads are pinned to the task's CPUs.

Outputs: the phase's model is the HF export ``models/bitnet`` (ternary weights as float
``codes * scale``: what phases 5-8 load); the packed model ``models/bitnet-packed`` (codes at
1.6 or 2 bits per weight, ``phases.bitnet.packed.load_packed``) is the artifact
``packed_model``. Artifacts ``bitnet_calibration_stats.json`` and
``bitnet_performance_report.json`` (the reference's names; functions of the config and seed);
the measured latencies and memory go to ``timings.json`` beside them and into the metrics,
never into a hashed artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.drivers.ray_tasks import HistoryWriter, wait_training
from coordinator.pipeline import PhaseContext, PhaseInputs, PhaseOutput, register_phase
from serialization.checkpoint import atomic_write_json

__all__ = ["run_bitnet"]


def _train_task(model_dir: str, bitnet: dict, data: dict, seed: int, work_dir: str, out_dir: str, packed_dir: str,
                threads: int, device: str) -> dict[str, Any]:
    import torch

    from phases.bitnet.config import BitNetConfig
    from phases.bitnet.train import train_bitnet
    from phases.data import DataConfig, load_corpus

    torch.set_num_threads(threads)
    cfg = BitNetConfig.model_validate(bitnet)
    corpus = load_corpus(DataConfig.model_validate(data), seed)
    log = HistoryWriter(Path(work_dir) / "history.jsonl")
    return train_bitnet(Path(model_dir), cfg, corpus, seed=seed, work_dir=Path(work_dir), out_dir=Path(out_dir),
                        packed_dir=Path(packed_dir), log=log, device=device)


@register_phase("bitnet", number=4, title="BitNet b1.58: ternary QAT", consumes="model")
def run_bitnet(inputs: PhaseInputs, ctx: PhaseContext) -> PhaseOutput:
    import ray

    (model_dir,) = inputs.models
    cfg = ctx.config.bitnet
    cpus = ctx.config.ray.cpus_per_task
    work = ctx.work_dir / "train"
    out_dir, packed_dir = ctx.phase_dir / "models" / "bitnet", ctx.phase_dir / "models" / "bitnet-packed"
    task = {"model_dir": str(model_dir), "bitnet": cfg.model_dump(mode="json"),
            "data": ctx.config.data.model_dump(mode="json"), "seed": ctx.seed, "work_dir": str(work),
            "out_dir": str(out_dir), "packed_dir": str(packed_dir), "threads": cpus,
            "device": "cuda" if cfg.gpus > 0 else "cpu"}
    # Ray retries a task whose worker died (max_retries); the task resumes from its checkpoint.
    ref = ray.remote(_train_task).options(name="bitnet.train", num_cpus=cpus, num_gpus=cfg.gpus,
                                          max_retries=2).remote(**task)
    result = wait_training(ref, work / "history.jsonl", cfg.steps, ctx)
    calibration = ctx.phase_dir / "bitnet_calibration_stats.json"
    report = ctx.phase_dir / "bitnet_performance_report.json"
    atomic_write_json(calibration, result["calibration"])
    atomic_write_json(report, result["report"])
    atomic_write_json(ctx.phase_dir / "timings.json", result["timings"])  # measured: not an artifact
    layers = [{"layer": name, "shape": "x".join(map(str, r["shape"])), "threshold": r["threshold"],
               "sparsity": r["zeros"] / r["weights"], "relative_error": r["abs_error_sum"] / max(r["abs_weight_sum"],
                                                                                                 1e-30)}
              for name, r in result["report"]["layers"].items()]
    return PhaseOutput(model=out_dir, models=[out_dir], metrics=result["metrics"],
                       artifacts={"packed_model": packed_dir, "calibration_stats": calibration,
                                  "performance_report": report},
                       tables={"ternary_layers": layers})
