"""The GA over merge recipes, on a synthetic fitness (distance to a hidden target recipe)."""

from __future__ import annotations

import json
import random

import pytest

from phases.evomerge.evolution import Evolution, EvolutionConfig, parent_genome
from phases.evomerge.genome import diversity, random_genome

TARGET = random_genome(random.Random(42), 3, 2)


def fitness(genomes):
    t = TARGET.genes()
    return [-sum(abs(a - b) for a, b in zip(g.genes(), t)) / len(t) + 0.1 * (g.method == TARGET.method) for g in genomes]


def test_parent_genomes_reproduce_each_parent():
    g = parent_genome(1, 3, 2)
    assert g.method == "linear" and all(row == (0.0, 1.0, 0.0) for row in g.weights)
    pop = Evolution(EvolutionConfig(population=8, groups=2), n_models=3, seed=0).initial()
    assert [p.key() for p in pop[:3]] == [parent_genome(i, 3, 2).key() for i in range(3)] and len(pop) == 8


def test_fitness_improves_and_never_drops_below_the_best_parent():
    cfg = EvolutionConfig(population=12, groups=2, max_generations=25, patience=25, mutation_rate=0.3,
                          mutation_strength=0.1)
    evo = Evolution(cfg, n_models=3, seed=1)
    best, best_fit = evo.run(fitness)
    parents = max(fitness([parent_genome(i, 3, 2) for i in range(3)]))
    bests = [r.best_fitness for r in evo.history]
    assert all(b2 >= b1 for b1, b2 in zip(bests, bests[1:])), "elitism: the best never gets worse"
    assert best_fit == bests[-1] == fitness([best])[0]
    assert best_fit > parents + 0.05 and best_fit > bests[0] + 0.05


def test_cache_evaluates_each_genome_once():
    calls = []

    def counting(genomes):
        calls.extend(g.key() for g in genomes)
        return fitness(genomes)

    evo = Evolution(EvolutionConfig(population=8, groups=2, max_generations=6, patience=6), n_models=3, seed=2)
    evo.run(counting)
    assert len(calls) == len(set(calls)), "no genome evaluated twice"
    assert sum(r.evaluated for r in evo.history) == len(calls)
    assert all(r.evaluated <= 8 - 2 for r in evo.history[1:]), "elites come from the cache"


def test_same_seed_same_run_and_early_stop():
    def run(seed):
        evo = Evolution(EvolutionConfig(population=8, groups=2, max_generations=10, patience=10), n_models=3, seed=seed)
        best, fit = evo.run(fitness)
        return best.key(), [r.best_key for r in evo.history]
    assert run(3) == run(3) and run(3) != run(4)
    flat = Evolution(EvolutionConfig(population=6, groups=1, max_generations=50, patience=5), n_models=2, seed=0)
    flat.run(lambda gs: [0.0] * len(gs))
    assert len(flat.history) == 6, "no improvement after the first generation: stop after patience=5 more"


def test_resume_from_a_checkpoint_gives_the_same_result():
    """Stop after generation 3 (a crash), rebuild from the JSON checkpoint: the same best genome."""
    cfg = EvolutionConfig(population=8, groups=2, max_generations=8, patience=8)
    whole = Evolution(cfg, n_models=3, seed=9)
    best_whole, fit_whole = whole.run(fitness)
    saved = {}

    def crash_after_3(record):
        if record.generation == 2:
            saved["state"] = json.loads(json.dumps(first.state_dict()))  # through JSON, as on disk
            raise KeyboardInterrupt

    first = Evolution(cfg, n_models=3, seed=9)
    with pytest.raises(KeyboardInterrupt):
        first.run(fitness, on_generation=crash_after_3)
    again = Evolution(cfg, n_models=3, seed=9)
    again.load_state_dict(saved["state"])
    best_again, fit_again = again.run(fitness)
    assert (best_again.key(), fit_again) == (best_whole.key(), fit_whole)
    assert [r.best_key for r in again.history] == [r.best_key for r in whole.history]


def test_diversity_floor_brings_in_immigrants():
    cfg = EvolutionConfig(population=8, groups=1, min_diversity=0.5, mutation_rate=0.0, crossover_rate=0.0)
    evo = Evolution(cfg, n_models=2, seed=0)
    clones = [parent_genome(0, 2, 1)] * 8
    nxt, immigrants = evo.next_generation(clones, [0.0] * 8)
    assert immigrants > 0 and diversity(nxt) > diversity(clones)


def test_state_with_a_failed_candidate_is_strict_json():
    evo = Evolution(EvolutionConfig(population=4, groups=1, max_generations=2, patience=2), n_models=2, seed=0)
    evo.run(lambda gs: [float("-inf") if i == 0 else 0.5 for i, _ in enumerate(gs)])
    text = json.dumps(evo.state_dict(), allow_nan=False)
    again = Evolution(evo.cfg, n_models=2, seed=0)
    again.load_state_dict(json.loads(text))
    assert again.cache == evo.cache and float("-inf") in again.cache.values()
