"""Phase 3 training (phases/quietstar/train.py): seeded runs give bit-identical thought models,
also after an interruption and resume; metrics are computed from the run; a foreign checkpoint
is refused without touching it."""

from __future__ import annotations

import math

import pytest

from phases.data import DataConfig, load_corpus
from phases.quietstar.config import QuietStarConfig
from phases.quietstar.model import load_thought_model
from phases.quietstar.train import RECORD_FIELDS, train_quietstar
from serialization.checkpoint import sha256_dir
from tests.phases.resume_checks import foreign_checkpoint_is_refused, interrupt_then_resume
from tests.phases.tiny_cognate import tiny_model_dir

DATA = DataConfig(seq_len=24)
CFG = QuietStarConfig(thought_length=2, n_thoughts=2, n_true=2, injection="hard", hard_fraction=0.25, steps=4,
                      batch_size=4, lr=1e-3, lr_warmup_steps=1, checkpoint_every=2, log_every=2, eval_batches=1,
                      eval_tasks=2, sample_thoughts=3)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DATA, seed=0)


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    return tiny_model_dir(corpus, tmp_path_factory.mktemp("in") / "m")


def _train(model_dir, corpus, root, cfg=CFG, log=None):
    return train_quietstar(model_dir, cfg, corpus, seed=3, work_dir=root / "work", out_dir=root / "out", log=log)


@pytest.fixture(scope="module")
def reference(model_dir, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    logged = []
    out = _train(model_dir, corpus, root, log=lambda m, s: logged.append((s, m)))
    return root, out, logged


def test_a_run_writes_a_thought_model_with_measured_metrics(reference):
    root, out, logged = reference
    model, tokenizer = load_thought_model(root / "out")
    assert model.cfg == CFG and tokenizer.convert_tokens_to_ids(CFG.end_token) == model.end_id
    m = out["metrics"]
    for name in RECORD_FIELDS:
        assert f"quietstar/{name}" in m
    for key in ("eval_loss_input", "eval_loss_base", "eval_loss_thought", "eval_loss_hard_thought"):
        assert math.isfinite(m[f"quietstar/{key}"]) and m[f"quietstar/{key}"] > 0
    assert m["quietstar/eval_loss_hard_input"] > m["quietstar/eval_loss_input"]  # hardest tokens by that model
    assert m["quietstar/injection_points"] == round(0.25 * (24 - 2)) and m["quietstar/thought_length_avg"] == 2
    assert m["quietstar/thoughts_filtered"] == 0.0  # no threshold
    assert m["quietstar/tokens"] == 4 * 4 * 24
    assert [s for s, _ in logged] == [2, 4] and "quietstar/lr" in logged[0][1]
    rows = out["samples"]
    assert len(rows) == 3 and set(rows[0]) == {"position", "context", "thought", "next_tokens", "coherence", "reward",
                                               "kept"}


def test_same_seed_same_hashes_also_after_an_interruption(reference, model_dir, corpus, tmp_path):
    root, _, _ = reference
    expected = sha256_dir(root / "out")
    again = tmp_path / "again"
    _train(model_dir, corpus, again)
    assert sha256_dir(again / "out") == expected

    cut = tmp_path / "cut"
    interrupt_then_resume(lambda r, log: _train(model_dir, corpus, r, log=log), cut, crash_step=4,
                          checkpoints_left=["ckpt-00000002.json"])
    assert sha256_dir(cut / "out") == expected


def test_a_checkpoint_of_another_config_is_refused_and_kept(reference, model_dir, corpus, tmp_path):
    root, _, _ = reference
    other = CFG.model_copy(update={"lr": 2e-3})
    foreign_checkpoint_is_refused(root / "work", tmp_path, lambda r: _train(model_dir, corpus, r, cfg=other))
