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

__all__ = ["evaluate_genome", "trial"]


@functools.lru_cache(maxsize=2)
def _worker_state(setup_json: str) -> dict[str, Any]:
    """Parents' state dicts, the corpus, its fixed task slice and a model skeleton, once per worker."""
    from transformers import AutoModelForCausalLM

    import phases.cognate  # noqa: F401 - registers the Cognate family with the Auto classes
    from phases.data import DataConfig, load_corpus

    setup = json.loads(setup_json)
    torch.set_num_threads(int(setup.get("threads", 1)))
    parents = [AutoModelForCausalLM.from_pretrained(p) for p in setup["parents"]]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in parents]
    corpus = load_corpus(DataConfig.from_dict(setup["data"]), seed=int(setup["seed"]))
    tasks = list(corpus.heldout_tasks[: int(setup["eval"]["tasks"])])
    return {"states": states, "skeleton": parents[0], "corpus": corpus, "tasks": tasks,
            "num_layers": int(getattr(parents[0].config, "num_hidden_layers", 1))}


def evaluate_genome(genome_json: dict, setup: dict) -> dict[str, Any]:
    """Merge and measure one genome; returns the objectives, the fitness and its terms."""
    from phases.evomerge.fitness import Objectives, composite, measure
    from phases.evomerge.genome import Genome
    from phases.evomerge.merge import merge

    state = _worker_state(json.dumps(setup, sort_keys=True))
    genome = Genome.from_json(genome_json)
    merged = merge(genome.method, state["states"], base=genome.base, parameters=genome.parameters_for(0),
                   per_tensor=genome.per_tensor(state["num_layers"]), seed=int(genome.key()[:8], 16))
    model = state["skeleton"]
    model.load_state_dict(merged)
    obj = measure(model, state["corpus"], state["tasks"], batch_size=int(setup["eval"]["batch_size"]),
                  max_batches=int(setup["eval"]["max_batches"]))
    fitness, terms = composite(obj, Objectives(**setup["reference"]))
    return {"fitness": fitness, **{f"terms/{k}": v for k, v in terms.items()},
            **{f"objectives/{k}": v for k, v in obj.to_json().items()}}


def trial(config: dict, setup: dict | None = None) -> None:
    """The Tune function trainable: one genome -> one ``tune.report``. ``setup`` comes through
    ``tune.with_parameters(trial, setup=...)`` (stored once in the object store)."""
    from ray import tune

    tune.report(evaluate_genome(config["genome"], setup if setup is not None else config["setup"]))
