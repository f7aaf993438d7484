"""One EvoMerge trial: merge the parents by a genome, evaluate the child, report its fitness.

Parents, the evaluation corpus and a model skeleton are loaded once per worker process and kept
(``_worker_state``): with Tune's ``reuse_actors=True`` a worker runs many trials, so weights
are read from disk once per worker, not per trial. A trial builds the child's state dict in
memory (``phases.evomerge.merge``), loads it into the skeleton, measures the objectives
(``phases.evomerge.fitness.measure``) and reports the composite against the run's reference.
Nothing is written to disk per trial: only the recipe (the genome) identifies a child, and the
driver re-merges the best one at the end.

The trial's config (from the searcher) has ``genome`` (JSON) and ``key``; ``setup`` (through
``tune.with_parameters``) is ``{"parents": [dirs], "data": DataConfig dict, "seed": int,
"eval": {"batch_size", "max_batches", "tasks"}, "reference": Objectives dict, "threads": int}``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

__all__ = ["child_model", "evaluate_genome", "materialize", "measure_parents", "trial"]


@functools.lru_cache(maxsize=2)
def _worker_state(setup_json: str) -> dict[str, Any]:
    """Parents' state dicts, their configs, the corpus and its fixed task slice, once per worker."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import phases.cognate.modeling  # noqa: F401 - registers the Cognate family with the Auto classes
    from phases.data import DataConfig, load_corpus

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per parent per worker is noise
    setup = json.loads(setup_json)
    torch.set_num_threads(int(setup.get("threads", 1)))
    parents = [AutoModelForCausalLM.from_pretrained(p) for p in setup["parents"]]
    corpus = load_corpus(DataConfig.from_dict(setup["data"]), seed=int(setup["seed"]))
    tasks = list(corpus.heldout_tasks[: int(setup["eval"]["tasks"])])
    # The parents' own modules are the skeletons a child is loaded into: skeleton i has parent
    # i's config (a genome's ``config_from``). Their weights are overwritten by each child;
    # ``states`` keeps the parents' tensors (``load_state_dict`` copies into the skeleton).
    skeletons = parents
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in parents]
    from phases.evomerge.layout import layer_indices

    return {"states": states, "skeletons": skeletons, "corpus": corpus, "tasks": tasks,
            "num_layers": int(getattr(parents[0].config, "num_hidden_layers", 1)),
            "stack": len(layer_indices(states[0])), "shaped": {}}


def _skeleton(state: dict[str, Any], config_from: int, stack: int) -> torch.nn.Module:
    """A model of parent ``config_from``'s config with ``stack`` layers in its layer stack
    (the parent's own module when the depth is unchanged; else built once per worker)."""
    if stack == state["stack"]:
        return state["skeletons"][config_from]
    key = (config_from, stack)
    if key not in state["shaped"]:
        from transformers import AutoModelForCausalLM

        from phases.evomerge.layout import layout_config

        parent = state["skeletons"][config_from].config
        cfg = type(parent).from_dict(layout_config(parent.to_dict(), state["stack"], stack))
        state["shaped"][key] = AutoModelForCausalLM.from_config(cfg)
    return state["shaped"][key]


def child_model(genome_json: dict, setup: dict) -> torch.nn.Module:
    """The child of a genome, merged in memory and loaded into the skeleton of its
    ``config_from`` parent (the worker's; the next call overwrites it)."""
    from phases.evomerge.genome import Genome
    from phases.evomerge.merging import merge

    state = _worker_state(json.dumps(setup, sort_keys=True))
    genome = Genome.from_json(genome_json)
    if genome.n_models != len(state["states"]):
        raise ValueError(f"the genome merges {genome.n_models} models, the setup has {len(state['states'])}")
    merged = merge(genome.method, state["states"], base=genome.base, parameters=genome.parameters_for(0),
                   per_tensor=genome.per_tensor(state["num_layers"]), seed=int(genome.key()[:8], 16))
    stack = state["stack"]
    if genome.layout:
        from phases.evomerge.layout import dfs_merge, path_from_bits

        # Source 0 is this genome's parameter-space merge, sources 1.. the models (PS+DFS).
        path = path_from_bits(genome.layout, len(state["states"]) + 1, state["stack"])
        merged, stack = dfs_merge([merged, *state["states"]], path, rest_from=0), len(path)
    model = _skeleton(state, genome.config_from, stack)
    model.load_state_dict(merged)
    return model


def _measure(model: torch.nn.Module, setup: dict):
    from phases.evomerge.fitness import measure

    state = _worker_state(json.dumps(setup, sort_keys=True))
    return measure(model, state["corpus"], state["tasks"], batch_size=int(setup["eval"]["batch_size"]),
                   max_batches=int(setup["eval"]["max_batches"]))


def measure_parents(setup: dict) -> dict[str, Any]:
    """``{"objectives": [per model, as loaded], "layers": depth of the layer stack}``: the
    fitness reference's inputs and what a layout genome needs to know."""
    state = _worker_state(json.dumps(setup, sort_keys=True))
    out = []
    for st, model in zip(state["states"], state["skeletons"]):
        model.load_state_dict(st)
        out.append(_measure(model, setup).to_json())
    return {"objectives": out, "layers": state["stack"]}


def _score(model: torch.nn.Module, setup: dict) -> dict[str, Any]:
    from phases.evomerge.fitness import Objectives, composite

    obj = _measure(model, setup)
    fitness, terms = composite(obj, Objectives(**setup["reference"]))
    return {"fitness": fitness, **{f"terms/{k}": v for k, v in terms.items()},
            **{f"objectives/{k}": v for k, v in obj.to_json().items()}}


def evaluate_genome(genome_json: dict, setup: dict) -> dict[str, Any]:
    """Merge and measure one genome; returns the objectives, the fitness and its terms."""
    return _score(child_model(genome_json, setup), setup)


def materialize(genome_json: dict, setup: dict, out_dir: str, tokenizer_from: str) -> dict[str, Any]:
    """Write the genome's child as an HF model dir (weights, config, and the tokenizer files of
    ``tokenizer_from``), atomically; returns its evaluation (as :func:`evaluate_genome`)."""
    import shutil
    from pathlib import Path

    from serialization.checkpoint import publish_dir, staging_dir

    model = child_model(genome_json, setup)  # merged once: scored and saved
    result = _score(model, setup)
    out = Path(out_dir)
    tmp = staging_dir(out)
    model.save_pretrained(str(tmp))
    written = {p.name for p in tmp.iterdir()}
    for f in Path(tokenizer_from).iterdir():  # tokenizer and special-token files, not weights
        if f.is_file() and f.name not in written and not f.name.endswith((".safetensors", ".bin", ".json.index")) \
                and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.suffix == ".model"):
            shutil.copy2(f, tmp / f.name)
    publish_dir(tmp, out)
    return result


def trial(config: dict, setup: dict | None = None) -> None:
    """The Tune function trainable: one genome -> one ``tune.report``. ``setup`` comes through
    ``tune.with_parameters(trial, setup=...)`` (stored once in the object store)."""
    from ray import tune

    import time

    t0 = time.perf_counter()
    result = evaluate_genome(config["genome"], setup if setup is not None else config["setup"])
    # wall seconds of the merge and evaluation inside the trial: reported, never a fitness input
    result["time/eval_s"] = time.perf_counter() - t0
    tune.report(result)
