"""EvoMerge trials on real models: a one-hot genome reproduces its parent's objectives exactly,
and a layout genome changes the child's depth and its speed and memory terms. (A whole Tune
search over real merges runs in test_evomerge_phase.py.)"""

from __future__ import annotations

import pytest
import torch

from coordinator.drivers.evomerge_trial import evaluate_genome
from phases.cognate import CognateConfig
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import build_model_config, save_model_dir
from phases.data import DataConfig, load_corpus
from phases.evomerge.evolution import parent_genome
from phases.evomerge.fitness import composite, measure, reference


CFG = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                    memory_slots=16, memory_chunk=8, max_seq_len=64, batch_size=8)
DATA = DataConfig(seq_len=32)
EVAL = {"batch_size": 4, "max_batches": 1, "tasks": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base and two 'fine-tunes' (base + noise), saved as HF dirs, and their reference."""
    root = tmp_path_factory.mktemp("parents")
    corpus = load_corpus(DATA, seed=0)
    torch.manual_seed(0)
    base = CognateForCausalLM(build_model_config(CFG, corpus.tokenizer))
    dirs, objs = [], []
    for i in range(3):
        model = CognateForCausalLM(base.config)
        model.load_state_dict(base.state_dict())
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(str(save_model_dir(model, corpus.tokenizer, root / f"p{i}")))
        objs.append(measure(model, corpus, list(corpus.heldout_tasks[:16]), batch_size=4, max_batches=1))
    ref = reference(objs)
    return {"parents": dirs, "data": DATA.model_dump(mode="json"), "seed": 0, "eval": EVAL,
            "reference": ref.to_json(), "threads": 1}, objs, ref


def test_a_parent_genome_reproduces_the_parent(setup):
    cfg, objs, ref = setup
    for i in range(3):
        got = evaluate_genome(parent_genome(i, 3, 2).to_json(), cfg)
        assert got["objectives/perplexity"] == pytest.approx(objs[i].perplexity, rel=1e-9)
        assert got["fitness"] == pytest.approx(composite(objs[i], ref)[0], rel=1e-9)


def test_a_layout_genome_changes_depth_and_the_speed_and_memory_terms(setup):
    """DFS: a path that runs the merge's layer twice and one parent's layer once gives a model
    two plain layers deeper (the pondered block stays): more FLOPs and bytes, lower speed and
    memory terms, and the recipe re-merges to the same numbers."""
    import dataclasses

    from phases.evomerge.evolution import identity_layout

    cfg, objs, ref = setup
    ident = identity_layout(3, 1, 2)  # 1 plain layer, 4 sources, 2 repeats
    deep = list(ident)
    deep[2] = 1  # source 2 (parent 1), layer 0, first repeat
    deep[4] = 1  # source 0 (the merge), layer 0, second repeat
    genome = dataclasses.replace(parent_genome(0, 3, 2), layout=tuple(deep))
    got = evaluate_genome(genome.to_json(), cfg)
    same = evaluate_genome(dataclasses.replace(parent_genome(0, 3, 2), layout=ident).to_json(), cfg)
    assert same["fitness"] == pytest.approx(composite(objs[0], ref)[0], rel=1e-9), "the identity layout is the parent"
    assert got["objectives/weight_bytes"] > same["objectives/weight_bytes"]
    assert got["terms/memory"] < same["terms/memory"] and got["terms/speed"] < same["terms/speed"]
    assert evaluate_genome(genome.to_json(), cfg)["fitness"] == got["fitness"]


def test_parents_load_once_per_worker_process(setup):
    """A worker (a Tune trial actor reused across trials) reads the parents once, then merges
    every later candidate from memory."""
    from coordinator.drivers.evomerge_trial import _worker_state

    cfg, _, _ = setup
    _worker_state.cache_clear()
    for i in range(3):
        evaluate_genome(parent_genome(i, 3, 2).to_json(), cfg)
    info = _worker_state.cache_info()
    assert info.misses == 1 and info.hits >= 3
