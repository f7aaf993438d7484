"""The EvoMerge phase through the pipeline runner on a real local Ray: its outputs (best model
dir, history, recipes, lineage), the base model taken from the upstream phase, and resume from
the search's checkpoint without running the search again. Slow (the phase's run, about 45 s on
2 cores); default-run siblings: the README's tiny run runs the phase through the CLI
(tests/e2e/test_cli.py) and the search's resume from a checkpoint is tested in
tests/phases/test_evomerge_evolution.py and test_evomerge_steady.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from coordinator import pipeline
from coordinator.config import PipelineConfig
from coordinator.drivers.evomerge_trial import evaluate_genome
from coordinator.pipeline import PHASES, PhaseOutput, parse_selection, run_pipeline
from coordinator.runfolder import RunFolder
from coordinator.tracking import Tracker
from phases.cognate import CognateConfig
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import build_model_config, save_model_dir
from phases.data import DataConfig, load_corpus

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

CFG = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=3, n_heads=2, d_ff=64,
                    memory_slots=16, memory_chunk=8, max_seq_len=64, batch_size=8)
DATA = DataConfig(seq_len=32)


def _parents(inputs, ctx):
    """A stand-in upstream phase: a base model and two 'fine-tunes' of it, the base named as
    the ``base_model`` artifact as Cognate names its shared warm-up model."""
    corpus = load_corpus(DATA, seed=0)
    torch.manual_seed(0)
    base = CognateForCausalLM(build_model_config(CFG, corpus.tokenizer))
    dirs = []
    for i in range(3):
        model = CognateForCausalLM(base.config)
        model.load_state_dict(base.state_dict())
        if i:
            model.config.act_threshold = 0.9 if i == 1 else 0.99  # variants differ in config too
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(save_model_dir(model, corpus.tokenizer, ctx.phase_dir / "models" / ("base", "a", "b")[i]))
    return PhaseOutput(models=dirs[1:], artifacts={"base_model": dirs[0]})


@pytest.fixture(scope="module")
def evomerge_run(tmp_path_factory):
    pipeline.ordered_phases()
    pipeline.register_phase("t_parents", number=0, title="test parents", consumes="none")(_parents)
    try:
        cfg = PipelineConfig(seed=3, data=DATA, wandb={"mode": "disabled"},
                             evomerge={"population": 5, "max_generations": 2, "groups": 2, "eval_batch_size": 4,
                                       "eval_batches": 1, "eval_tasks": 8})
        run = RunFolder(tmp_path_factory.mktemp("evo") / "run")
        plan = parse_selection(["t_parents", "evomerge"])
        run.create(run_id="r", config=cfg.model_dump(mode="json"), seed=3, plan=[s.name for s in plan])
        results = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"))
        yield cfg, run, plan, results
    finally:
        PHASES.pop("t_parents")


def test_the_phase_writes_the_best_model_history_recipes_and_lineage(evomerge_run):
    from transformers import AutoModelForCausalLM

    cfg, run, _, results = evomerge_run
    result = results[-1]
    assert result.success, result.error
    phase = run.root / "02_evomerge"
    m = result.metrics
    assert m["evomerge/generations"] == 2 and m["evomerge/failed_trials"] == 0
    assert m["evomerge/best_fitness"] >= m["evomerge/best_parent_fitness"]
    assert m["evomerge/best_fitness_remerged"] == m["evomerge/best_fitness"], "the re-merged best scores as in the search"

    recipe = json.loads((phase / "recipe.json").read_text())
    assert recipe["model_names"][0] == "base (base)", "the upstream phase's base_model is the merge base"
    assert recipe["genome"]["base"] == 0 and len(recipe["models"]) == 3
    assert not any(Path(p).is_absolute() for p in recipe["models"]), "paths inside the run are relative"
    setup = {"parents": [str((phase / p).resolve()) for p in recipe["models"]], "data": DATA.model_dump(mode="json"),
             "seed": 3, "eval": {"batch_size": 4, "max_batches": 1, "tasks": 8},
             "reference": None, "threads": 1}
    model = AutoModelForCausalLM.from_pretrained(run.resolve(result.model))
    assert model.config.act_threshold == json.loads(
        (phase / recipe["models"][recipe["genome"]["config_from"]] / "config.json").read_text())["act_threshold"]

    rows = [json.loads(line) for line in (phase / "history.jsonl").read_text().splitlines()]
    assert [r["evomerge/generation"] for r in rows] == [0, 1]
    assert [r["evomerge/convergence_patience"] for r in rows][0] == 5
    for key in ("evomerge/best_fitness", "evomerge/avg_fitness", "evomerge/diversity", "evomerge/perplexity",
                "evomerge/accuracy"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["evomerge/best_fitness"] == m["evomerge/best_fitness"]

    assert not [p for p in (phase / "work").rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")], \
        "only recipes are checkpointed, never children's weights"

    doc = yaml.safe_load((phase / "recipe.yaml").read_text())
    assert doc["merge_method"] == recipe["genome"]["method"] and doc["slices"]
    lineage = json.loads((phase / "lineage.json").read_text())
    nodes = {n["key"]: n for n in lineage["nodes"]}
    assert lineage["nodes"][0]["key"] == lineage["best"] == recipe["key"]
    for node in nodes.values():
        assert all(p in nodes for p in node["parents"]), "every ancestor of the best is listed"
        assert node["op"] in ("parent", "random", "immigrant") or node["parents"]

    # The recipe alone reproduces the model: merge again in this process and compare weights.
    from coordinator.drivers.evomerge_trial import child_model

    setup["reference"] = {"perplexity": 1.0, "accuracy": 0.0, "flops_per_token": 1.0, "weight_bytes": 1}
    child = child_model(recipe["genome"], setup)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, child.state_dict()[name]), name
    assert evaluate_genome(recipe["genome"], setup)["objectives/perplexity"] == pytest.approx(m["evomerge/perplexity"])


def test_a_rerun_resumes_from_the_search_checkpoint(evomerge_run):
    cfg, run, plan, results = evomerge_run
    phase = run.root / "02_evomerge"
    before = {p.name: p.read_bytes() for p in phase.iterdir() if p.is_file() and p.name != "result.json"}
    weights = (phase / "models" / "best" / "model.safetensors").read_bytes()
    (phase / "result.json").unlink()
    shutil.rmtree(phase / "work" / "tune")
    (result,) = run_pipeline(cfg, run, plan[1:], tracker=Tracker(cfg.wandb, run, "r2"), resume=True)
    assert result.success, result.error
    assert not (phase / "work" / "tune").exists(), "a finished search is not run again"
    assert {p.name: p.read_bytes() for p in phase.iterdir() if p.is_file() and p.name != "result.json"} == before
    assert (phase / "models" / "best" / "model.safetensors").read_bytes() == weights
