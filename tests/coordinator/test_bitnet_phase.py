"""Phase 4's driver on a real local Ray: SIGKILL the worker process running the QAT task in the
middle of training; Ray retries the task, it resumes from its last checkpoint, and the phase's
models equal those of an uninterrupted run bit for bit.

Slow (about 30 s: two worker starts); default-run siblings: the interruption test in
tests/phases/test_bitnet_train.py (the same resume, in process) and the tiny run's phase 4 in
tests/e2e/test_cli.py (the driver on Ray)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from coordinator.config import PipelineConfig, WandbConfig
from coordinator.pipeline import parse_selection, run_pipeline
from coordinator.runfolder import RunFolder
from coordinator.tracking import Tracker
from phases.bitnet.config import BitNetConfig
from phases.bitnet.train import train_bitnet
from phases.data import DataConfig, load_corpus
from serialization.checkpoint import sha256_dir
from tests.phases.tiny_cognate import tiny_model_dir

pytestmark = pytest.mark.usefixtures("ray_local")

DATA = DataConfig(seq_len=24)
BITNET = BitNetConfig(calibration_samples=8, sparsity_thresholds=True, steps=60, batch_size=4, lr=1e-3,
                      lr_warmup_steps=2, checkpoint_every=10, log_every=1, eval_batches=1, eval_tasks=0,
                      profile_batch=1, profile_seq_len=8, profile_repeats=1, grokfast={"enabled": True})
SEED = 5


def _task_pids(name: str) -> list[int]:
    """Processes whose title is Ray's ``ray::<task name>`` (a worker running that task; Linux)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"ray::{name}".encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(load_corpus(DATA, seed=SEED), tmp_path_factory.mktemp("in") / "m")


@pytest.mark.slow
def test_a_killed_qat_task_is_retried_and_resumes_to_the_same_models(model_dir, tmp_path):
    cfg = PipelineConfig(wandb=WandbConfig(mode="disabled"), data=DATA, bitnet=BITNET, seed=SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.ray.cpus_per_task)  # as the task does: the same kernels, the same bits
    try:
        ref = tmp_path / "ref"
        train_bitnet(model_dir, BITNET, load_corpus(DATA, SEED), seed=SEED, work_dir=ref / "work", out_dir=ref / "hf",
                     packed_dir=ref / "packed")
    finally:
        torch.set_num_threads(threads)

    run = RunFolder(tmp_path / "run")
    run.create(run_id="b", config=cfg.model_dump(mode="json"), seed=SEED, plan=["bitnet"])
    history = run.root / "04_bitnet" / "work" / "train" / "history.jsonl"
    killed: list[tuple[int, int]] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [json.loads(line)["step"] for line in history.read_text().splitlines()] if history.exists() else []
            if steps and max(steps) >= 15:  # past a checkpoint, far from the end
                for pid in _task_pids("bitnet.train"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, max(steps)))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    (result,) = run_pipeline(cfg, run, parse_selection("bitnet"), tracker=Tracker(cfg.wandb, run, "b"),
                             input_models=[model_dir])
    thread.join(timeout=5)
    assert result.success, result.error
    assert killed and killed[0][1] < BITNET.steps, "the task was killed mid-training"
    steps = [json.loads(line)["step"] for line in history.read_text().splitlines()]
    replays = [s for i, s in enumerate(steps) if i and s <= steps[i - 1]]
    assert replays and replays[0] <= killed[0][1] and max(steps) == BITNET.steps, "resumed from a checkpoint"
    phase = run.root / "04_bitnet" / "models"
    assert sha256_dir(phase / "bitnet") == sha256_dir(ref / "hf")
    assert sha256_dir(phase / "bitnet-packed") == sha256_dir(ref / "packed")
