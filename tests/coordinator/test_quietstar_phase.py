"""Phase 3 on a real local Ray, through the pipeline: Quiet-STaR trains thoughts into an upstream
phase's model; the output is an HF dir with the thought files; the sample thoughts land in
tables.json, the report and the offline W&B run; the step metrics in metrics.jsonl."""

from __future__ import annotations

import html
import json

import pytest
import torch

from coordinator import pipeline
from coordinator.config import PipelineConfig
from coordinator.pipeline import PHASES, PhaseOutput, parse_selection, run_pipeline
from coordinator.report import build_report
from coordinator.runfolder import RunFolder
from coordinator.tracking import Tracker
from phases.cognate import CognateConfig
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import build_model_config, save_model_dir
from phases.data import DataConfig, load_corpus

pytestmark = pytest.mark.usefixtures("ray_local")

DATA = DataConfig(seq_len=24)
QUIETSTAR = {"thought_length": 2, "n_thoughts": 2, "n_true": 2, "injection": "hard", "hard_fraction": 0.25,
             "steps": 4, "batch_size": 4, "lr": 1e-3, "lr_warmup_steps": 1, "checkpoint_every": 2, "log_every": 2,
             "eval_batches": 1, "eval_tasks": 2, "sample_thoughts": 3}


def _model(inputs, ctx):
    """A stand-in upstream phase: a small untrained Cognate model."""
    corpus = load_corpus(DATA, seed=0)
    torch.manual_seed(0)
    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                        memory_slots=16, memory_chunk=8, max_seq_len=64)
    model = CognateForCausalLM(build_model_config(cfg, corpus.tokenizer))
    return PhaseOutput(model=save_model_dir(model, corpus.tokenizer, ctx.phase_dir / "models" / "m"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pipeline.ordered_phases()
    pipeline.register_phase("t_model", number=0, title="test model", consumes="none")(_model)
    try:
        root = tmp_path_factory.mktemp("qs")
        cfg = PipelineConfig(seed=5, data=DATA, wandb={"mode": "offline"}, quietstar=QUIETSTAR)
        folder = RunFolder(root / "run")
        plan = parse_selection(["t_model", "quietstar"])
        folder.create(run_id="qs", config=cfg.model_dump(mode="json"), seed=5, plan=[s.name for s in plan])
        yield folder, run_pipeline(cfg, folder, plan, tracker=Tracker(cfg.wandb, folder, "qs"))
    finally:
        PHASES.pop("t_model")


def test_the_phase_writes_a_thought_model_and_its_tables(run):
    from phases.quietstar.model import load_thought_model

    folder, results = run
    result = results[-1]
    assert result.success, result.error
    model, _ = load_thought_model(folder.resolve(result.model))
    assert model.cfg.steps == 4
    assert result.metrics["quietstar/steps"] == 4 and "quietstar/eval_loss_thought" in result.metrics
    phase_dir = folder.phase_dir(3, "quietstar")
    tables = json.loads((phase_dir / "tables.json").read_text())
    assert len(tables["thought_examples"]) == 3
    assert json.loads((phase_dir / "quietstar_thought_examples.json").read_text()) == tables["thought_examples"]
    history = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [2, 4] and "quietstar/thought_coherence_avg" in history[0]
    report = build_report(folder).read_text()
    assert "<h3>thought_examples</h3>" in report
    assert all(html.escape(row["next_tokens"]) in report for row in tables["thought_examples"])
    wandb_tables = list((folder.root / "wandb").glob("offline-run-*/files/media/table/thought_examples_*.table.json"))
    assert wandb_tables, "the sample thoughts must be logged to W&B as a table"
    logged = json.loads(wandb_tables[0].read_text())
    assert set(logged["columns"]) == set(tables["thought_examples"][0]) and len(logged["data"]) == 3
