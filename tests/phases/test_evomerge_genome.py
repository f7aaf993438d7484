"""The EvoMerge genome: identity, mapping to merge parameters, and the variation operators."""

from __future__ import annotations

import random

import pytest
import torch

from phases.evomerge import Genome, MergeError, crossover, diversity, layer_group, merge, mutate, random_genome, tournament


def test_layer_groups_split_layers_into_blocks_and_the_rest():
    assert [layer_group(f"model.layers.{i}.mlp.w", 8, 4) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert layer_group("model.embed_tokens.weight", 8, 4) == 4
    assert layer_group("lm_head.weight", 8, 4) == 4
    assert layer_group("layers.5.x", 6, 1) == 0


def test_key_is_stable_and_json_round_trips():
    g = random_genome(random.Random(3), 3, 2)
    assert Genome.from_json(g.to_json()) == g and Genome.from_json(g.to_json()).key() == g.key()
    other = random_genome(random.Random(4), 3, 2)
    assert other.key() != g.key()


def test_a_genome_merges_each_layer_group_with_its_own_coefficients():
    models = [{f"layers.{i}.w": torch.full((2,), float(m + 1)) for i in range(4)} | {"head": torch.full((2,), float(m + 1))}
              for m in range(2)]
    g = Genome(method="linear", weights=((1.0, 0.0), (0.0, 1.0), (0.5, 0.5)), densities=((1, 1),) * 3,
               t=(0.5, 0.5, 0.5))
    out = merge(g.method, models, base=g.base, parameters=g.parameters_for(0), per_tensor=g.per_tensor(4))
    assert [out[f"layers.{i}.w"][0].item() for i in range(4)] == [1.0, 1.0, 2.0, 2.0]
    assert out["head"][0].item() == 1.5


def test_tournament_takes_the_fittest_of_its_sample():
    pop = [random_genome(random.Random(i), 2, 1) for i in range(6)]
    fit = [0.1, 0.9, 0.3, 0.2, 0.5, 0.4]
    assert tournament(random.Random(0), pop, fit, size=6) is pop[1]
    winners = {id(tournament(random.Random(s), pop, fit, size=3)) for s in range(50)}
    assert id(pop[0]) not in winners and id(pop[3]) not in winners, "the two worst never win a 3-way tournament"


def test_crossover_and_mutation_respect_their_rates_and_ranges():
    rng = random.Random(1)
    a, b = random_genome(rng, 3, 2), random_genome(rng, 3, 2)
    assert crossover(random.Random(0), a, b, rate=0.0) == a
    child = crossover(random.Random(0), a, b, rate=1.0)
    assert all(x in (p, q) for x, p, q in zip(child.genes(), a.genes(), b.genes()))
    assert child.genes() != a.genes() and child.genes() != b.genes()
    assert mutate(random.Random(0), a, rate=0.0) == a
    m = mutate(random.Random(0), a, rate=1.0, strength=0.5)
    changed = sum(x != y for x, y in zip(m.genes(), a.genes()))
    assert changed >= len(a.genes()) - 3  # clamping may leave a value at its bound unchanged
    assert all(0.0 <= w <= 1.0 for r in m.weights for w in r) and all(0.1 <= d <= 1.0 for r in m.densities for d in r)


def test_variation_replays_under_a_seed():
    def run(seed):
        rng = random.Random(seed)
        pop = [random_genome(rng, 3, 2) for _ in range(8)]
        fit = [rng.random() for _ in pop]
        return [mutate(rng, crossover(rng, tournament(rng, pop, fit), tournament(rng, pop, fit))).key() for _ in range(8)]
    assert run(5) == run(5) and run(5) != run(6)


def test_diversity_is_zero_for_clones_and_grows_with_spread():
    g = random_genome(random.Random(0), 3, 2)
    assert diversity([g, g, g]) == 0.0
    near = [g, mutate(random.Random(1), g, rate=1.0, strength=0.01)]
    far = [g, random_genome(random.Random(9), 3, 2)]
    assert 0 < diversity(near) < diversity(far)


def test_bad_genomes_are_refused():
    with pytest.raises(MergeError, match="not evolvable"):
        Genome(method="passthrough", weights=((1.0,),), densities=((1.0,),), t=(0.5,))
    with pytest.raises(MergeError, match="rows disagree"):
        Genome(method="linear", weights=((1.0, 1.0),), densities=((1.0, 1.0), (1.0, 1.0)), t=(0.5,))
    assert all(random_genome(random.Random(s), 3, 1).method != "slerp" for s in range(40)), "slerp needs 2 models"
