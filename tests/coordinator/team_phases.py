"""What the agent-team phase tests (phases 6 and 8) share: a stand-in upstream phase that trains
a small Cognate model, and running one phase after it through the pipeline runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coordinator import pipeline
from coordinator.config import PipelineConfig
from coordinator.pipeline import PHASES, PhaseOutput, parse_selection, run_pipeline
from coordinator.runfolder import RunFolder
from coordinator.tracking import Tracker
from phases.cognate import CognateConfig
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import build_model_config, save_model_dir
from phases.data import DataConfig, load_corpus

DATA = DataConfig(seq_len=32)
STAND_IN = "t_trained"


def trained_phase(max_seq_len: int) -> Callable[[Any, Any], PhaseOutput]:
    """A stand-in upstream phase: a small Cognate model (``max_seq_len`` positions) trained 30 steps
    on the corpus, saved as the phase's model."""
    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                        memory_slots=16, memory_chunk=8, max_seq_len=max_seq_len, batch_size=8)

    def run(inputs, ctx):
        corpus = load_corpus(DATA, seed=0)
        torch.manual_seed(0)
        model = CognateForCausalLM(build_model_config(cfg, corpus.tokenizer))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(30):
            x = corpus.batch(step, 8, 32, 0)
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return PhaseOutput(model=save_model_dir(model.eval(), corpus.tokenizer, ctx.phase_dir / "models" / "m"))

    return run


def registered(fn: Callable[[Any, Any], PhaseOutput]):
    """Register ``fn`` as the stand-in phase (number 0) while the generator runs (a fixture body)."""
    pipeline.ordered_phases()
    pipeline.register_phase(STAND_IN, number=0, title="test model", consumes="none")(fn)
    yield
    PHASES.pop(STAND_IN)


def run_after_stand_in(root: Path, phase: str, **sections: Any):
    """The stand-in, then ``phase``, in a run folder under ``root`` (seed 5, W&B off); ``sections``
    are config sections (``compress={...}``, ``chaos={...}``). Returns (run folder, results)."""
    cfg = PipelineConfig(seed=5, data=DATA, wandb={"mode": "disabled"}, **sections)
    run = RunFolder(root / "run")
    plan = parse_selection([STAND_IN, phase])
    run.create(run_id=root.name[:12], config=cfg.model_dump(mode="json"), seed=5, plan=[s.name for s in plan])
    return run, run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"))


def output_hashes(result) -> dict[str, str]:
    """sha256 of every model and artifact of a phase's result."""
    return {**{m.path: m.sha256 for m in result.models}, **{k: a.sha256 for k, a in result.artifacts.items()}}
