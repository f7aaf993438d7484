"""EvoMerge's GA on real Ray Tune: trials run concurrently, and the search equals the plain GA."""

from __future__ import annotations

import random

import pytest
from ray import tune

from coordinator.drivers.evomerge_tune import run_search
from phases.evomerge.evolution import Evolution, EvolutionConfig
from phases.evomerge.genome import Genome, random_genome

pytestmark = pytest.mark.usefixtures("ray_local")

TARGET = random_genome(random.Random(7), 3, 1)
CFG = EvolutionConfig(population=6, groups=1, max_generations=4, patience=4)


def synthetic_fitness(genome: Genome) -> float:
    t = TARGET.genes()
    return -sum(abs(a - b) for a, b in zip(genome.genes(), t)) / len(t) + 0.1 * (genome.method == TARGET.method)


def trainable(config: dict) -> None:
    """A trial: fitness of the genome it was given (a stand-in for merge + evaluate)."""
    genome = Genome.from_json(config["genome"])
    assert genome.key() == config["key"]
    tune.report({"fitness": synthetic_fitness(genome)})


def failing_trainable(config: dict, bad_key: str) -> None:
    if config["key"] == bad_key:
        raise RuntimeError("this candidate crashes its trial")
    tune.report({"fitness": synthetic_fitness(Genome.from_json(config["genome"]))})


def test_tune_search_equals_the_plain_ga(tmp_path):
    plain = Evolution(CFG, n_models=3, seed=5)
    best_plain, fit_plain = plain.run(lambda gs: [synthetic_fitness(g) for g in gs])
    records = []
    evo = Evolution(CFG, n_models=3, seed=5)
    best, fit, searcher = run_search(trainable, evo, storage_path=tmp_path, name="ga", resources={"cpu": 0.5},
                                     on_generation=records.append)
    assert (best.key(), fit) == (best_plain.key(), fit_plain)
    assert [r.best_key for r in records] == [r.best_key for r in plain.history]
    assert sum(r.evaluated for r in records) == len(evo.cache) == len(plain.cache)
    assert not searcher.failed


@pytest.mark.slow  # about 16 s; default-run sibling: tests/chaos/test_evomerge_nodes.py (lost trials)
def test_a_failing_trial_scores_minus_inf_and_the_search_goes_on(tmp_path):
    cfg = CFG.model_copy(update={"max_generations": 1})
    bad = Evolution(cfg, n_models=3, seed=1).initial()[-1]  # a random genome of the first population
    evo = Evolution(cfg, n_models=3, seed=1)
    best, fit, searcher = run_search(tune.with_parameters(failing_trainable, bad_key=bad.key()), evo,
                                     storage_path=tmp_path, name="fail", resources={"cpu": 0.5}, max_failures=0,
                                     resubmits=0)
    assert searcher.failed == [bad.key()] and evo.cache[bad.key()] == float("-inf")
    assert len(evo.cache) == 6 and best.key() != bad.key() and fit > float("-inf")


def slow_trainable(config: dict) -> None:
    """Trials of uneven length, so completion order differs from dispatch order."""
    import time

    genome = Genome.from_json(config["genome"])
    time.sleep(0.05 * (int(config["key"][:2], 16) % 4))
    tune.report({"fitness": synthetic_fitness(genome)})


@pytest.mark.slow  # about 18 s; the default run checks generational breeding on Tune (below)
def test_continuous_breeding_on_tune_equals_the_sequential_steady_state(tmp_path):
    from phases.evomerge.steady import SteadyState

    cfg = CFG.model_copy(update={"max_generations": 3})
    plain = SteadyState(cfg, n_models=3, seed=5, window=4)
    best_plain, fit_plain = plain.run_sequential(synthetic_fitness)
    evo = SteadyState(cfg, n_models=3, seed=5, window=4)
    best, fit, searcher = run_search(slow_trainable, evo, storage_path=tmp_path, name="steady",
                                     resources={"cpu": 0.5})
    assert (best.key(), fit) == (best_plain.key(), fit_plain)
    assert [r.best_key for r in evo.history] == [r.best_key for r in plain.history]
    assert [g.key() for g in evo.children[: evo.applied]] == [g.key() for g in plain.children[: plain.applied]]


@pytest.mark.parametrize("kind", ["generational", "steady"])
def test_a_trial_tune_gave_up_on_is_resubmitted_once_then_scores_minus_inf(kind):
    """The searcher alone (no Tune run): an errored trial's genome goes out again as a new
    trial; a second error within the budget of one resubmit makes it a failure scoring -inf."""
    from coordinator.drivers.evomerge_tune import GenomeSearcher, SteadySearcher
    from phases.evomerge.steady import SteadyState

    if kind == "steady":
        searcher = SteadySearcher(SteadyState(CFG, n_models=3, seed=2, window=4), resubmits=1)
    else:
        searcher = GenomeSearcher(Evolution(CFG, n_models=3, seed=2), resubmits=1)
    first = searcher.suggest("t1")
    searcher.on_trial_complete("t1", error=True)
    again = searcher.suggest("t2")
    assert again["key"] == first["key"] and searcher.resubmitted == {first["key"]: 1}
    assert not searcher.failed and first["key"] not in searcher.evo.cache
    searcher.on_trial_complete("t2", error=True)
    assert searcher.failed == [first["key"]] and searcher.evo.cache[first["key"]] == float("-inf")
    nxt = searcher.suggest("t3")
    assert nxt is not None and nxt["key"] != first["key"]
