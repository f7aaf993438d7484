"""Phase 8 recipe search: Pareto front, weighted score, NSGA-II search (determinism, cache, front)."""

from __future__ import annotations

import itertools
import math

import pytest

from phases.compression.search import SearchResult, Trial, pareto_front, search_recipes, weighted_score


def _pts(*pairs):
    return [{"retention": r, "compression": c} for r, c in pairs]


def test_pareto_front_on_hand_made_points():
    points = _pts((1.0, 1.0),  # 0: best retention
                  (0.5, 2.0),  # 1: best compression
                  (0.5, 2.0),  # 2: a tie with 1: both kept
                  (0.4, 1.5),  # 3: dominated by 1
                  (0.4, 1.5),  # 4: its duplicate, also dominated
                  (1.0, 0.5),  # 5: equal retention to 0, less compression: dominated
                  (0.8, 1.5))  # 6: a trade-off point
    assert pareto_front(points) == [0, 1, 2, 6]
    assert pareto_front([]) == []
    assert pareto_front(_pts((0.3, 3.0))) == [0]
    assert pareto_front(_pts((0.5, 2.0), (0.5, 2.0))) == [0, 1], "equal points do not dominate each other"
    three = [{"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 0}, {"a": 0, "b": 2, "c": 0}]
    assert pareto_front(three, maximize=("a", "b", "c")) == [0, 2]
    with pytest.raises(KeyError, match="point 1 has no objective 'compression'"):
        pareto_front([{"retention": 1, "compression": 1}, {"retention": 1}])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front(_pts((math.nan, 1.0)))


def test_weighted_score_bounds_golden_values_and_monotonicity():
    assert weighted_score(32.0, 1.0) == pytest.approx(1.0)
    assert weighted_score(1.0, 0.0) == 0.0
    assert weighted_score(0.5, 1.0) == pytest.approx(0.6), "no compression earns nothing, not less"
    assert weighted_score(4.0, 0.9) == pytest.approx(0.4 * 0.4 + 0.6 * 0.9)  # log 4 / log 32 = 2/5
    assert weighted_score(1000.0, 1.2) == pytest.approx(1.0), "both terms are clipped to [0, 1]"
    assert weighted_score(4.0, 1.0, reference_ratio=16.0) == pytest.approx(0.4 * 0.5 + 0.6)
    assert weighted_score(4.0, 0.5, weights=(2.0, 2.0)) == pytest.approx((0.4 + 0.5) / 2), "weights are normalised"
    ratios = [0.5, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    rets = [0.0, 0.3, 0.9, 0.95, 1.0, 1.1]
    for r in rets:
        scores = [weighted_score(c, r) for c in ratios]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert scores == sorted(scores) and scores[4] < scores[5]
    for c in ratios:
        scores = [weighted_score(c, r) for r in rets]
        assert scores == sorted(scores) and scores[1] < scores[2]
    for bad in ({"weights": (-0.1, 1.0)}, {"weights": (0.0, 0.0)}, {"reference_ratio": 1.0}):
        with pytest.raises(ValueError):
            weighted_score(4.0, 0.9, **bad)
    with pytest.raises(ValueError, match="NaN"):
        weighted_score(math.nan, 0.9)


# A toy problem with a known answer: 4 weight matrices, each int8/int4/int2 (8/4/2 bits).
# Compression is 32 x 4 / total bits; each matrix loses retention by its sensitivity x the
# codec's error, so which matrices get the low-bit codecs decides where a point lies.
CODECS = {"int8": 8, "int4": 4, "int2": 2}
ERROR = {"int8": 0.001, "int4": 0.01, "int2": 0.05}
SENSITIVITY = {"layers.0.q": 0.5, "layers.0.up": 1.0, "layers.1.q": 2.0, "layers.1.up": 4.0}
CHOICES = {name: list(CODECS) for name in SENSITIVITY}


def _toy(recipe):
    bits = sum(CODECS[c] for c in recipe.values())
    return {"retention": 1.0 - sum(SENSITIVITY[n] * ERROR[c] for n, c in recipe.items()),
            "compression": 32.0 * len(recipe) / bits, "bits": bits}


def _true_front():
    recipes = [dict(zip(SENSITIVITY, combo)) for combo in itertools.product(CODECS, repeat=len(SENSITIVITY))]
    metrics = [_toy(r) for r in recipes]
    return {tuple(r.values()) for i, r in enumerate(recipes) if i in set(pareto_front(metrics))}


UNIFORM = [{name: codec for name in SENSITIVITY} for codec in CODECS]


def _counting(fn):
    calls = []

    def evaluate(recipe):
        calls.append(dict(recipe))
        return fn(recipe)

    return evaluate, calls


def test_search_is_deterministic_runs_initial_first_and_caches():
    evaluate, calls = _counting(_toy)
    initial = UNIFORM + [UNIFORM[0]]  # the repeat is served from the cache
    result = search_recipes(CHOICES, evaluate, trials=20, seed=3, initial=initial)
    assert len(result.trials) == 24 and [t.number for t in result.trials] == list(range(24))
    assert [t.recipe for t in result.trials[:4]] == initial and calls[:3] == UNIFORM
    assert result.trials[3].cached and not any(t.cached for t in result.trials[:3])
    distinct = {tuple(t.recipe.values()) for t in result.trials}
    assert result.evaluations == len(calls) == len(distinct), "no recipe is evaluated twice"
    assert result.cache_hits == 24 - len(distinct) >= 1
    assert all(t.metrics == _toy(t.recipe) for t in result.trials)
    again = search_recipes(CHOICES, _toy, trials=20, seed=3, initial=initial)
    assert again.to_json() == result.to_json(), "the same seed gives the same trial list"
    other = search_recipes(CHOICES, _toy, trials=20, seed=4, initial=initial)
    assert [t.recipe for t in other.trials] != [t.recipe for t in result.trials]
    only_initial = search_recipes(CHOICES, _toy, trials=0, seed=0, initial=UNIFORM)
    assert [t.recipe for t in only_initial.trials] == UNIFORM


def test_search_finds_points_on_the_true_front():
    truth = _true_front()
    result = search_recipes(CHOICES, _toy, trials=60, seed=0, initial=UNIFORM)
    found = [tuple(result.trials[i].recipe.values()) for i in result.front]
    on_true = [f for f in found if f in truth]
    assert ("int8",) * 4 in on_true and ("int2",) * 4 in on_true, "the extremes are on every front"
    assert len(on_true) >= 4 and len(on_true) / len(found) >= 0.5
    # Every front index is a first occurrence and no two front recipes repeat.
    assert len(set(found)) == len(found) and all(not result.trials[i].cached for i in result.front)
    choice = result.choose()
    assert choice.gate_met and choice.index in result.front
    assert choice.score == max(weighted_score(result.trials[i].metrics["compression"],
                                              result.trials[i].metrics["retention"]) for i in result.front)
    rnd = search_recipes(CHOICES, _toy, trials=10, seed=0, sampler="random")
    assert rnd.population_size is None and len(rnd.trials) == 10
    assert rnd.to_json() == search_recipes(CHOICES, _toy, trials=10, seed=0, sampler="random").to_json()


def test_choose_with_and_without_a_retention_gate():
    def trial(i, r, c):
        return Trial(i, {"w": str(i)}, {"retention": r, "compression": c, "bits": 1})

    trials = [trial(0, 1.0, 1.0), trial(1, 0.97, 4.0), trial(2, 0.90, 16.0), trial(3, 0.80, 2.0)]
    result = SearchResult(trials=trials, front=pareto_front([t.metrics for t in trials]), seed=0, sampler="nsga2",
                          evaluations=4, cache_hits=0)
    assert result.front == [0, 1, 2]
    scores = {i: weighted_score(trials[i].metrics["compression"], trials[i].metrics["retention"]) for i in range(3)}
    assert max(scores, key=scores.get) == 2
    assert result.choose().index == 2 and result.choose().score == pytest.approx(scores[2])
    gated = result.choose(min_retention=0.95)
    assert gated.index == 1 and gated.gate_met
    assert result.choose(weights=(0.0, 1.0)).index == 0
    unmet = result.choose(min_retention=1.01)
    assert unmet.index == 0 and not unmet.gate_met, "no point meets the gate: the highest retention"
    assert unmet.to_json()["gate_met"] is False
    with pytest.raises(ValueError, match="no trials"):
        SearchResult(trials=[], front=[], seed=0, sampler="nsga2", evaluations=0, cache_hits=0).choose()


def test_search_rejects_bad_input():
    with pytest.raises(ValueError, match="'layers.0.q' = 'fp8' is not one of its choices"):
        search_recipes(CHOICES, _toy, trials=1, seed=0, initial=[{**UNIFORM[0], "layers.0.q": "fp8"}])
    with pytest.raises(ValueError, match="missing"):
        search_recipes(CHOICES, _toy, trials=1, seed=0, initial=[{"layers.0.q": "int8"}])
    with pytest.raises(ValueError, match="nsga2, random"):
        search_recipes(CHOICES, _toy, trials=1, seed=0, sampler="tpe")
    with pytest.raises(ValueError, match="nothing to search"):
        search_recipes(CHOICES, _toy, trials=0, seed=0)
    with pytest.raises(ValueError, match="missing \\['bits'\\]"):
        search_recipes(CHOICES, lambda r: {"retention": 1.0, "compression": 2.0}, trials=1, seed=0)
    with pytest.raises(ValueError, match="must be finite"):
        search_recipes(CHOICES, lambda r: {"retention": math.nan, "compression": 2.0, "bits": 8}, trials=1, seed=0)
