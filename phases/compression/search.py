"""Phase 8's architecture optimizer: a multi-objective search over per-weight codec recipes.

A recipe assigns one codec to each weight matrix (``{"model.layers.0.mlp.up_proj.weight":
"int4", ...}``). Each recipe is evaluated by the caller (compress, run on held-out data) into at
least ``retention`` (held-out token accuracy vs the input model, higher is better),
``compression`` (input bytes / compressed bytes, higher is better) and ``bits``. The search
maximises both objectives with NSGA-II (Deb et al. 2002, "A fast and elitist multiobjective
genetic algorithm: NSGA-II") through optuna's ``NSGAIISampler`` and its ask/tell interface;
trials run one after another, so a seed fixes the whole trial list.

- :func:`pareto_front`: the non-dominated points (a point is dominated when another is at
  least as good in every objective and strictly better in one, the rule Microsoft Olive's
  search uses); equal points do not dominate each other, so ties are all kept.
- :func:`weighted_score`: the reference analysis' 0.4 compression / 0.6 retention weighting
  that picks one point of the front. Compression ratios are unbounded, so the ratio is put on a
  log scale against a fixed ``reference_ratio`` (default 32: float32 weights at 1 bit each):
  ``log(ratio) / log(reference_ratio)`` clipped to [0, 1]. Log, because each halving of the
  bits is the same step (4x -> 8x counts as much as 8x -> 16x; a linear scale would make the
  first 2x nearly worthless next to the last). Fixed, because then a candidate's score does
  not depend on which other candidates were tried (normalising by the largest ratio seen
  would let one extreme candidate reorder all the others). Retention is clipped to [0, 1] as
  well: a candidate earns nothing for measuring above the reference (that is noise).
- :func:`search_recipes`: the search, with the given ``initial`` recipes (e.g. each codec
  everywhere) evaluated first and every recipe evaluated at most once (a repeat is served
  from a cache and still recorded as a trial).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SAMPLERS", "Choice", "SearchResult", "Trial", "pareto_front", "search_recipes", "weighted_score"]

SAMPLERS = ("nsga2", "random")
OBJECTIVES = ("retention", "compression")  # both maximised
REQUIRED_METRICS = ("retention", "compression", "bits")
DEFAULT_REFERENCE_RATIO = 32.0  # float32 -> 1 bit per weight


def pareto_front(points: Sequence[Mapping[str, float]], *, maximize: Sequence[str] = OBJECTIVES) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Args:
        points: each a mapping holding every objective in ``maximize``.
        maximize: the objectives, all higher-is-better.
    Returns:
        Ascending indices of the points no other point dominates (equal points are all kept).
    Raises:
        KeyError: a point lacks an objective (the message names the point and the key).
        ValueError: an objective is NaN.
    """
    values = []
    for i, p in enumerate(points):
        row = []
        for key in maximize:
            if key not in p:
                raise KeyError(f"point {i} has no objective {key!r} (keys: {', '.join(map(str, p))})")
            v = float(p[key])
            if math.isnan(v):
                raise ValueError(f"point {i}: objective {key!r} is NaN")
            row.append(v)
        values.append(row)

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, v in enumerate(values) if not any(dominates(u, v) for j, u in enumerate(values) if j != i)]


def weighted_score(compression_ratio: float, retention: float, *, weights: tuple[float, float] = (0.4, 0.6),
                   reference_ratio: float = DEFAULT_REFERENCE_RATIO) -> float:
    """``(w_c * log(ratio)/log(reference_ratio) + w_r * retention) / (w_c + w_r)``, each term
    clipped to [0, 1], so the score is in [0, 1] (see the module docstring for why log).

    Args:
        compression_ratio: input bytes / compressed bytes (<= 1 scores 0 on that term).
        retention: held-out accuracy retention.
        weights: (compression weight, retention weight), both >= 0, sum > 0.
        reference_ratio: the ratio that scores 1 (> 1).
    Raises:
        ValueError: bad weights, reference ratio, or a NaN input.
    """
    w_c, w_r = weights
    if w_c < 0 or w_r < 0 or w_c + w_r <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    if not reference_ratio > 1:
        raise ValueError(f"reference_ratio must be > 1, got {reference_ratio}")
    if math.isnan(compression_ratio) or math.isnan(retention):
        raise ValueError(f"NaN input: compression_ratio={compression_ratio}, retention={retention}")
    c = 0.0 if compression_ratio <= 1 else min(1.0, math.log(compression_ratio) / math.log(reference_ratio))
    r = min(1.0, max(0.0, retention))
    return (w_c * c + w_r * r) / (w_c + w_r)


@dataclass(frozen=True)
class Trial:
    """One evaluated recipe."""

    number: int  # position in the search (initial recipes first)
    recipe: dict[str, str]
    metrics: dict[str, Any]
    cached: bool = False  # True: the recipe was seen before and served from the cache

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "recipe": dict(self.recipe), "metrics": dict(self.metrics),
                "cached": self.cached}


@dataclass(frozen=True)
class Choice:
    """The trial :meth:`SearchResult.choose` picked and why."""

    index: int  # into SearchResult.trials
    trial: Trial
    score: float  # weighted_score of the trial
    gate_met: bool  # False: no front point met min_retention; this is the highest-retention one

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "trial": self.trial.to_json(), "score": self.score, "gate_met": self.gate_met}


@dataclass(frozen=True)
class SearchResult:
    """Every trial of a search and the Pareto front of its distinct recipes."""

    trials: list[Trial]
    front: list[int]  # indices into trials of the non-dominated distinct recipes (first occurrence)
    seed: int
    sampler: str
    evaluations: int  # calls of evaluate (distinct recipes)
    cache_hits: int  # trials served from the cache
    population_size: int | None = None  # NSGA-II's generation size (None for random search)

    def to_json(self) -> dict[str, Any]:
        return {"trials": [t.to_json() for t in self.trials], "front": list(self.front), "seed": self.seed,
                "sampler": self.sampler, "evaluations": self.evaluations, "cache_hits": self.cache_hits,
                "population_size": self.population_size}

    def choose(self, weights: tuple[float, float] = (0.4, 0.6), min_retention: float | None = None,
               reference_ratio: float | None = None) -> Choice:
        """The front point with the best :func:`weighted_score` among those meeting
        ``min_retention``; when none does, the front point with the highest retention (then the
        highest compression) and ``gate_met=False``. Ties go to the earlier trial.

        Args:
            weights: (compression, retention) weights.
            min_retention: the retention a choice must reach; None: no gate.
            reference_ratio: the compression ratio that scores 1; None: the larger of 32 and
                the highest ratio among the trials (so no trial's compression term saturates).
        Raises:
            ValueError: the search has no trials.
        """
        if not self.front:
            raise ValueError("the search has no trials to choose from")
        if reference_ratio is None:
            reference_ratio = max([DEFAULT_REFERENCE_RATIO] + [float(t.metrics["compression"]) for t in self.trials])

        def score(i: int) -> float:
            m = self.trials[i].metrics
            return weighted_score(m["compression"], m["retention"], weights=weights, reference_ratio=reference_ratio)

        eligible = [i for i in self.front if min_retention is None or self.trials[i].metrics["retention"] >= min_retention]
        if eligible:
            best = max(eligible, key=lambda i: (score(i), -i))
            return Choice(best, self.trials[best], score(best), True)
        best = max(self.front, key=lambda i: (self.trials[i].metrics["retention"],
                                              self.trials[i].metrics["compression"], -i))
        return Choice(best, self.trials[best], score(best), False)


def _check_recipe(recipe: Mapping[str, str], choices: Mapping[str, Sequence[str]], where: str) -> dict[str, str]:
    missing = [k for k in choices if k not in recipe]
    extra = [k for k in recipe if k not in choices]
    if missing or extra:
        raise ValueError(f"{where}: recipe must name exactly the searched parameters; "
                         f"missing {missing}, unknown {extra}")
    for k, v in recipe.items():
        if v not in choices[k]:
            raise ValueError(f"{where}: {k!r} = {v!r} is not one of its choices {list(choices[k])}")
    return {k: recipe[k] for k in choices}


def _check_metrics(metrics: Mapping[str, Any], number: int) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"evaluate() must return a mapping, got {type(metrics).__name__} (trial {number})")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise ValueError(f"evaluate() returned {sorted(metrics)} for trial {number}: missing {missing}")
    for k in OBJECTIVES:
        if not math.isfinite(float(metrics[k])):
            raise ValueError(f"evaluate() returned {k}={metrics[k]!r} for trial {number}: must be finite")
    return dict(metrics)


def search_recipes(choices: Mapping[str, Sequence[str]], evaluate: Callable[[dict[str, str]], Mapping[str, Any]], *,
                   trials: int, seed: int, initial: Sequence[Mapping[str, str]] = (), sampler: str = "nsga2",
                   population_size: int | None = None) -> SearchResult:
    """Search codec recipes, maximising retention and compression.

    Args:
        choices: parameter name -> the codecs it may take (in a fixed order).
        evaluate: recipe -> metrics with at least ``retention``, ``compression``, ``bits``;
            called at most once per distinct recipe, in trial order.
        trials: sampled trials after the ``initial`` ones (>= 0; 0: only the initial recipes).
        seed: the sampler's seed; the same seed gives the same trial list.
        initial: recipes evaluated first, in order (e.g. one codec everywhere).
        sampler: ``"nsga2"`` (NSGA-II) or ``"random"``.
        population_size: NSGA-II's generation size; None: ``min(50, max(4, total trials // 5))``
            so a small budget still runs several generations (the first one is random).
    Returns:
        The :class:`SearchResult`.
    Raises:
        ValueError: empty choices, a bad initial recipe, an unknown sampler, no trial at all,
            or metrics that lack a required key or hold a non-finite objective.
        TypeError: ``evaluate`` returned something other than a mapping.
    """
    if not choices or any(len(v) == 0 for v in choices.values()):
        raise ValueError("choices must name at least one parameter, each with at least one codec")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if trials < 0:
        raise ValueError(f"trials must be >= 0, got {trials}")
    start = [_check_recipe(r, choices, f"initial recipe {i}") for i, r in enumerate(initial)]
    total = len(start) + trials
    if total == 0:
        raise ValueError("nothing to search: trials is 0 and no initial recipe was given")

    import optuna  # heavy and only needed here

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler == "nsga2":
        pop = population_size if population_size is not None else min(50, max(4, total // 5))
        chosen = optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    else:
        pop = None
        chosen = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=chosen)
    for recipe in start:
        study.enqueue_trial(dict(recipe))

    names = list(choices)
    cache: dict[tuple[str, ...], dict[str, Any]] = {}
    done: list[Trial] = []
    first: dict[tuple[str, ...], int] = {}  # recipe -> index of its first trial
    for number in range(total):
        trial = study.ask()
        recipe = {n: trial.suggest_categorical(n, list(choices[n])) for n in names}
        key = tuple(recipe[n] for n in names)
        cached = key in cache
        if not cached:
            cache[key] = _check_metrics(evaluate(dict(recipe)), number)
            first[key] = number
        metrics = cache[key]
        study.tell(trial, [float(metrics["retention"]), float(metrics["compression"])])
        done.append(Trial(number, recipe, dict(metrics), cached))

    distinct = sorted(first.values())
    front = [distinct[i] for i in pareto_front([done[i].metrics for i in distinct])]
    return SearchResult(trials=done, front=front, seed=seed, sampler=sampler, evaluations=len(cache),
                        cache_hits=total - len(cache), population_size=pop)
