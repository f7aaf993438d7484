"""The drivers of the phases that train in one Ray task (phase 4's QAT, phase 5's Forge training)
on a real local Ray: SIGKILL the worker process running the task in the middle of training; Ray
retries the task, it resumes from its last checkpoint, and the phase's models equal those of an
uninterrupted run bit for bit.

Slow (about 30 s each: two worker starts); default-run siblings: the interruption tests in
tests/phases/test_bitnet_train.py and test_forge_train.py (the same resume, in process) and the
tiny run's phases 4 and 5 in tests/e2e/test_cli.py (the drivers on Ray)."""

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
from phases.forge.config import ForgeConfig
from phases.forge.train import train_forge
from serialization.checkpoint import sha256_dir
from tests.phases.tiny_cognate import tiny_model_dir

pytestmark = pytest.mark.usefixtures("ray_local")

DATA = DataConfig(seq_len=24)
BITNET = BitNetConfig(calibration_samples=8, sparsity_thresholds=True, steps=60, batch_size=4, lr=1e-3,
                      lr_warmup_steps=2, checkpoint_every=10, log_every=1, eval_batches=1, eval_tasks=0,
                      profile_batch=1, profile_seq_len=8, profile_repeats=1, grokfast={"enabled": True})
FORGE = ForgeConfig(steps=60, batch_size=4, eval_every=20, checkpoint_every=10, log_every=1, eval_batches=1,
                    eval_tasks=0, grokfast={"enabled": True}, dream={"enabled": True, "every": 12, "steps": 3},
                    edge={"enabled": True}, self_model={"enabled": True})
SEED = 5


def _bitnet_reference(model_dir: Path, out: Path) -> dict[str, Path]:
    train_bitnet(model_dir, BITNET, load_corpus(DATA, SEED), seed=SEED, work_dir=out / "work", out_dir=out / "hf",
                 packed_dir=out / "packed")
    return {"bitnet": out / "hf", "bitnet-packed": out / "packed"}


def _forge_reference(model_dir: Path, out: Path) -> dict[str, Path]:
    train_forge(model_dir, FORGE, load_corpus(DATA, SEED), seed=SEED, work_dir=out / "work", out_dir=out / "hf")
    return {"forge": out / "hf"}


# phase, its folder, its task's name, its config section, its uninterrupted run (the models it writes)
PHASES = [("bitnet", "04_bitnet", "bitnet.train", {"bitnet": BITNET}, _bitnet_reference),
          ("forge", "05_forge", "forge.train", {"forge": FORGE}, _forge_reference)]


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
@pytest.mark.parametrize("phase, folder, task, section, reference", PHASES, ids=[p[0] for p in PHASES])
def test_a_killed_training_task_is_retried_and_resumes_to_the_same_models(phase, folder, task, section, reference,
                                                                           model_dir, tmp_path):
    cfg = PipelineConfig(wandb=WandbConfig(mode="disabled"), data=DATA, seed=SEED, **section)
    steps_total = section[phase].steps
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.ray.cpus_per_task)  # as the task does: the same kernels, the same bits
    try:
        ref = reference(model_dir, tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)

    run = RunFolder(tmp_path / "run")
    run.create(run_id="b", config=cfg.model_dump(mode="json"), seed=SEED, plan=[phase])
    history = run.root / folder / "work" / "train" / "history.jsonl"
    killed: list[tuple[int, int]] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [json.loads(line)["step"] for line in history.read_text().splitlines()] if history.exists() else []
            if steps and max(steps) >= 15:  # past a checkpoint, far from the end
                for pid in _task_pids(task):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, max(steps)))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    (result,) = run_pipeline(cfg, run, parse_selection(phase), tracker=Tracker(cfg.wandb, run, "b"),
                             input_models=[model_dir])
    thread.join(timeout=5)
    assert result.success, result.error
    assert killed and killed[0][1] < steps_total, "the task was killed mid-training"
    steps = [json.loads(line)["step"] for line in history.read_text().splitlines()]
    replays = [s for i, s in enumerate(steps) if i and s <= steps[i - 1]]
    assert replays and replays[0] <= killed[0][1] and max(steps) == steps_total, "resumed from a checkpoint"
    for name, path in ref.items():
        assert sha256_dir(run.root / folder / "models" / name) == sha256_dir(path), name
