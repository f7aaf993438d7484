"""Continuous breeding (steady-state GA): the search does not depend on completion order or on
how many workers run it, at most ``window`` children run ahead, the best is never lost, and a
resume from a saved state continues exactly."""

from __future__ import annotations

import random

import pytest

from phases.evomerge.evolution import EvolutionConfig
from phases.evomerge.genome import Genome, random_genome
from phases.evomerge.steady import SteadyState

TARGET = random_genome(random.Random(3), 3, 2)
CFG = EvolutionConfig(population=6, groups=2, max_generations=5, patience=5)


def fitness(g: Genome) -> float:
    t = TARGET.genes()
    return -sum(abs(a - b) for a, b in zip(g.genes(), t)) / len(t) + 0.1 * (g.method == TARGET.method)


def _workers(k: int, seed: int):
    """Completion order of a cluster with k workers: k of the runnable children, shuffled."""
    rng = random.Random(seed)

    def order(todo):
        batch = todo[:k]
        rng.shuffle(batch)
        return batch
    return order


def _run(order=None, window=4) -> SteadyState:
    evo = SteadyState(CFG, n_models=3, seed=11, window=window)
    evo.run_sequential(fitness, order)
    return evo


@pytest.mark.parametrize("k,seed", [(1, 0), (2, 1), (3, 2), (8, 3), (50, 4)])
def test_the_search_is_the_same_for_any_worker_count_and_completion_order(k, seed):
    ref, got = _run(), _run(_workers(k, seed))
    assert [g.key() for g in got.children] == [g.key() for g in ref.children]
    assert (got.best.key(), got.best_fitness) == (ref.best.key(), ref.best_fitness)
    assert [(r.best_key, r.evaluated, r.immigrants) for r in got.history] == \
        [(r.best_key, r.evaluated, r.immigrants) for r in ref.history]


def test_breeding_never_runs_more_than_window_ahead_and_the_best_stays_in_the_archive():
    evo = SteadyState(CFG, n_models=3, seed=2, window=3)
    evo.start()
    best_parent = max(fitness(g) for g in evo.children[:3])
    while not evo.done:
        todo = evo.runnable()
        limit = CFG.population if evo.applied < 2 else max(CFG.population, evo.applied + 3)
        assert len(evo.children) <= limit
        g = todo[0][1]
        evo.cache[g.key()] = fitness(g)
        evo.apply_ready()
        if evo.best is not None:
            assert any(m.key() == evo.best.key() for m in evo.population), "the best is never evicted"
    assert len(evo.history) == CFG.max_generations and evo.best_fitness >= best_parent
    assert evo.best_fitness > best_parent, "steady-state breeding improves on the parents"


def test_resume_from_a_saved_state_continues_exactly():
    import json

    ref = _run()
    evo = SteadyState(CFG, n_models=3, seed=11, window=4)
    evo.start()
    while evo.generation < 2:  # stop after two epochs, with children in flight
        g = evo.runnable()[0][1]
        evo.cache[g.key()] = fitness(g)
        evo.apply_ready()
    state = json.loads(json.dumps(evo.state_dict()))
    resumed = SteadyState(CFG, n_models=3, seed=11, window=4)
    resumed.load_state_dict(state)
    resumed.run_sequential(fitness)
    assert [g.key() for g in resumed.children] == [g.key() for g in ref.children]
    assert (resumed.best.key(), resumed.best_fitness) == (ref.best.key(), ref.best_fitness)
