"""Phase 3 data-parallel on a real local Ray: two Ray Train workers (gloo) split every batch,
average their gradients and stay identical (checked at every checkpoint: the run fails if they
differ); worker 0 checkpoints, evaluates and writes the model. Slow (a Ray Train worker group
starts in about 30 s on 2 cores); default-run siblings: the training loop and its resume in
tests/phases/test_quietstar_train.py, the single-task driver in the README run's phase 3
(tests/e2e/test_cli.py)."""

from __future__ import annotations

import pytest
import torch

from coordinator.drivers.quietstar import _data_parallel_task
from phases.cognate import CognateConfig
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import build_model_config, save_model_dir
from phases.data import DataConfig, load_corpus
from phases.quietstar.config import QuietStarConfig
from phases.quietstar.model import load_thought_model

pytestmark = pytest.mark.usefixtures("ray_local")

DATA = DataConfig(seq_len=24)
CFG = QuietStarConfig(thought_length=2, n_thoughts=2, n_true=2, injection="hard", hard_fraction=0.25, steps=4,
                      batch_size=4, lr=1e-3, lr_warmup_steps=1, checkpoint_every=2, log_every=2, eval_batches=1,
                      eval_tasks=2, sample_thoughts=2, workers=2)


@pytest.mark.slow
def test_two_workers_train_one_model(tmp_path):
    import ray

    corpus = load_corpus(DATA, seed=0)
    torch.manual_seed(0)
    cog = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                        memory_slots=16, memory_chunk=8, max_seq_len=64)
    model_dir = save_model_dir(CognateForCausalLM(build_model_config(cog, corpus.tokenizer, "memory")),
                               corpus.tokenizer, tmp_path / "in")
    task = {"model_dir": str(model_dir), "quietstar": CFG.model_dump(mode="json"),
            "data": DATA.model_dump(mode="json"), "seed": 3, "work_dir": str(tmp_path / "work"),
            "out_dir": str(tmp_path / "out"), "threads": 1}
    run = ray.remote(_data_parallel_task).options(num_cpus=0)
    result = ray.get(run.remote(task, 2, 1, 0.0, str(tmp_path / "ray_train")))
    m = result["metrics"]
    assert m["quietstar/steps"] == 4 and m["quietstar/injection_points"] == round(0.25 * 22)
    assert len(result["samples"]) == 2
    model, _ = load_thought_model(tmp_path / "out")
    assert model.cfg.workers == 2
    assert sorted(p.name for p in (tmp_path / "work").glob("ckpt-*.json")) == ["ckpt-00000002.json",
                                                                               "ckpt-00000004.json"]
    history = (tmp_path / "work" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2, "worker 0 alone logs"
