"""Phase 7's search: the archive of every candidate (recipe, measurements, verdict, lineage), its
Pareto front, and the evolutionary proposer that breeds new recipes from it.

The proposer is NSGA-II's loop (Deb et al. 2002, "A fast and elitist multiobjective genetic
algorithm: NSGA-II") over the recipe genes, with its constrained-domination rule for the safety
gates (a candidate that meets every requirement of the profile ranks before any that does not):
parents are drawn by binary tournament on (feasibility, non-domination rank, crowding distance),
a child takes each gene from one parent (uniform crossover) and then mutates genes (a step to a
neighbouring value of an ordered gene, any other value of a categorical one), and children are
checked against the declared space and the archive (no recipe is measured twice). Parents are
drawn from the archive rather than the whole archive being handed to a generator, as Hu et al.'s
ADAS found selection works better (notes-deployment-and-origins.md, C).

Hand-written rather than optuna's ``NSGAIISampler`` (which phase 8 uses): the archive records
each child's parents and how it was made (the lineage the report shows), and optuna's sampler
does not expose which trials a child came from.

Objectives (:data:`OBJECTIVES`): ``decision: deterministic`` (the default, DESIGN "Determinism")
uses measures that are functions of the weights and the artifact: held-out accuracy, matmul
FLOPs per token, bytes on disk; the search then proposes the same recipes on
every machine. ``decision: measured`` uses the timings (call p95 latency, peak memory) instead;
independent runs may then differ. Either way the safety gates use the measured latencies and
memory (they are requirements), and the measurements are stored keyed by the recipe's hash.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from phases.adas.recipes import ARCH_GENES, DEPLOY_GENES, Recipe, Space

__all__ = ["OBJECTIVES", "Archive", "Candidate", "Proposal", "choose", "crowding", "non_dominated_sort",
           "propose"]

# (metric, direction): +1 maximise, -1 minimise
OBJECTIVES: dict[str, tuple[tuple[str, int], ...]] = {
    "deterministic": (("accuracy", 1), ("flops_per_token", -1), ("disk_bytes", -1)),
    "measured": (("accuracy", 1), ("call_p95_ms", -1), ("disk_bytes", -1), ("memory_bytes", -1)),
}
# the winner among the candidates that passed: minimise these, in order (lexicographic priority)
CHOICE_ORDER: dict[str, tuple[tuple[str, int], ...]] = {
    "deterministic": (("disk_bytes", -1), ("flops_per_token", -1), ("accuracy", 1)),
    "measured": (("call_p95_ms", -1), ("disk_bytes", -1), ("accuracy", 1)),
}
_ORDERED = ("drop_layers", "ffn_keep", "low_rank", "threads", "batch_size")  # mutate to a neighbour


@dataclass(frozen=True)
class Proposal:
    recipe: Recipe
    parents: tuple[str, ...]  # keys of the parents (empty for seeds and random proposals)
    origin: str  # "seed", "random", "crossover", "mutation"


@dataclass
class Candidate:
    """One archived candidate: its recipe, lineage, measurements and the safety verdict."""

    recipe: Recipe
    generation: int
    parents: tuple[str, ...] = ()
    origin: str = "seed"
    metrics: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)  # requirements it broke, with the measured values
    error: str | None = None  # the build or measurement failed (the candidate is infeasible)

    @property
    def key(self) -> str:
        return self.recipe.key()

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "recipe": self.recipe.to_json(), "generation": self.generation,
                "parents": list(self.parents), "origin": self.origin, "metrics": dict(self.metrics),
                "passed": self.passed, "reasons": list(self.reasons), "error": self.error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Candidate":
        return cls(recipe=Recipe.from_json(data["recipe"]), generation=int(data["generation"]),
                   parents=tuple(data["parents"]), origin=str(data["origin"]), metrics=dict(data["metrics"]),
                   passed=bool(data["passed"]), reasons=list(data["reasons"]), error=data.get("error"))


def _values(c: Candidate, objectives: Sequence[tuple[str, int]]) -> list[float]:
    """Objective values turned to maximise (a failed measurement is the worst value)."""
    out = []
    for name, sign in objectives:
        v = c.metrics.get(name)
        out.append(-math.inf if v is None or c.error else sign * float(v))
    return out


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated_sort(points: Sequence[Sequence[float]]) -> list[int]:
    """NSGA-II's fronts: the rank (0 = non-dominated) of each point, all objectives maximised."""
    n = len(points)
    dominated_by = [[j for j in range(n) if j != i and _dominates(list(points[i]), list(points[j]))]
                    for i in range(n)]
    count = [sum(1 for j in range(n) if j != i and _dominates(list(points[j]), list(points[i]))) for i in range(n)]
    rank = [0] * n
    current = [i for i in range(n) if count[i] == 0]
    r = 0
    while current:
        nxt = []
        for i in current:
            rank[i] = r
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        current, r = nxt, r + 1
    return rank


def crowding(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance within one set of points (boundary points: infinity)."""
    n = len(points)
    dist = [0.0] * n
    if n == 0:
        return dist
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += (points[b][k] - points[a][k]) / (hi - lo)
    return dist


class Archive:
    """Every candidate measured, in the order they were added (see the module docstring)."""

    def __init__(self, candidates: Sequence[Candidate] = ()) -> None:
        self.candidates: list[Candidate] = list(candidates)

    def __len__(self) -> int:
        return len(self.candidates)

    def keys(self) -> set[str]:
        return {c.key for c in self.candidates}

    def add(self, candidate: Candidate) -> None:
        """Raises ValueError when the recipe is archived already."""
        if candidate.key in self.keys():
            raise ValueError(f"recipe {candidate.key} ({candidate.recipe.describe()}) is archived already")
        self.candidates.append(candidate)

    def ranks(self, decision: str) -> tuple[list[tuple[int, int]], list[float]]:
        """Per candidate, (0 if it passed else 1, non-domination rank within its group), and its
        crowding distance within its front (constrained domination, NSGA-II)."""
        objectives = OBJECTIVES[decision]
        keys: list[tuple[int, int]] = [(0, 0)] * len(self.candidates)
        dist = [0.0] * len(self.candidates)
        for group in (0, 1):
            idx = [i for i, c in enumerate(self.candidates) if (0 if c.passed else 1) == group]
            pts = [_values(self.candidates[i], objectives) for i in idx]
            rank = non_dominated_sort(pts)
            for r in set(rank):
                members = [j for j in range(len(idx)) if rank[j] == r]
                for j, d in zip(members, crowding([pts[j] for j in members])):
                    dist[idx[j]] = d
            for j, i in enumerate(idx):
                keys[i] = (group, rank[j])
        return keys, dist

    def front(self, decision: str, *, passed_only: bool = False) -> list[int]:
        """Indices of the Pareto front over :data:`OBJECTIVES` ``[decision]`` (of all measured
        candidates, or of those that passed)."""
        objectives = OBJECTIVES[decision]
        idx = [i for i, c in enumerate(self.candidates) if c.error is None and (c.passed or not passed_only)]
        rank = non_dominated_sort([_values(self.candidates[i], objectives) for i in idx])
        return [i for i, r in zip(idx, rank) if r == 0]

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.candidates]

    @classmethod
    def from_json(cls, rows: Sequence[Mapping[str, Any]]) -> "Archive":
        return cls([Candidate.from_json(r) for r in rows])


def _neighbour(values: tuple[Any, ...], current: Any, rng: random.Random, ordered: bool) -> Any:
    if len(values) == 1:
        return current
    if ordered and current in values:
        i = values.index(current)
        steps = [j for j in (i - 1, i + 1) if 0 <= j < len(values)]
        return values[rng.choice(steps)]
    return rng.choice([v for v in values if v != current])


def _random_recipe(space: Space, rng: random.Random) -> Recipe:
    return Recipe(**{g: rng.choice(v) for g, v in space.genes().items()})


def seed_recipe(space: Space) -> Recipe:
    """The input model deployed as plainly as the space allows: no architecture change, fp32
    (else the first precision), eager (else the first backend), the most threads, the smallest batch."""
    return Recipe(drop_layers=0, ffn_keep=1.0, low_rank=1.0,
                  precision="fp32" if "fp32" in space.precision else space.precision[0],
                  backend="eager" if "eager" in space.backend else space.backend[0],
                  threads=max(space.threads), batch_size=min(space.batch_size))


def propose(archive: Archive, space: Space, *, n: int, seed: int, generation: int, decision: str = "deterministic",
            mutation_rate: float | None = None, max_tries: int = 200) -> list[Proposal]:
    """``n`` new recipes (never in the archive, all in ``space``).

    Generation 0 (or an empty archive): the :func:`seed_recipe`, then one recipe per deployment
    value that differs from it in that gene alone (so the first generation measures each
    backend and precision), then random ones. Later: tournament-selected parents, uniform
    crossover, mutation (each gene with probability ``mutation_rate``, default 1/genes; at
    least one gene changes when the child equals a parent). When no new recipe turns up in
    ``max_tries`` draws, random ones fill in; fewer than ``n`` come back only when the space
    is exhausted.
    """
    rng = random.Random(f"{seed}:{generation}")
    genes = space.genes()
    rate = mutation_rate if mutation_rate is not None else 1.0 / len(genes)
    seen = archive.keys()
    out: list[Proposal] = []

    def take(recipe: Recipe, parents: tuple[str, ...], origin: str) -> bool:
        if len(out) >= n or recipe.key() in seen or space.allows(recipe) is not None:
            return False
        seen.add(recipe.key())
        out.append(Proposal(recipe, parents, origin))
        return True

    if len(archive) == 0:
        base = seed_recipe(space)
        take(base, (), "seed")
        for gene in DEPLOY_GENES + ARCH_GENES:
            for value in genes[gene]:
                take(replace(base, **{gene: value}), (base.key(),), "mutation")
    else:
        keys, dist = archive.ranks(decision)
        pool = list(range(len(archive)))

        def tournament() -> Candidate:
            a, b = rng.choice(pool), rng.choice(pool)
            better = a if (keys[a], -dist[a]) <= (keys[b], -dist[b]) else b
            return archive.candidates[better]

        tries = 0
        while len(out) < n and tries < max_tries:
            tries += 1
            p1, p2 = tournament(), tournament()
            child = {g: getattr(p1.recipe if rng.random() < 0.5 else p2.recipe, g) for g in genes}
            mutated = False
            for g in genes:
                if rng.random() < rate:
                    child[g] = _neighbour(genes[g], child[g], rng, g in _ORDERED)
                    mutated = True
            recipe = Recipe(**child)
            if recipe in (p1.recipe, p2.recipe):
                g = rng.choice(list(genes))
                recipe = replace(recipe, **{g: _neighbour(genes[g], getattr(recipe, g), rng, g in _ORDERED)})
                mutated = True
            parents = tuple(dict.fromkeys((p1.key, p2.key)))
            take(recipe, parents, "crossover" if len(parents) == 2 and not mutated else
                 ("crossover+mutation" if len(parents) == 2 else "mutation"))
    tries = 0
    while len(out) < n and tries < max_tries:
        tries += 1
        take(_random_recipe(space, rng), (), "random")
    return out


def choose(archive: Archive, decision: str = "deterministic") -> int | None:
    """Index of the winner: among the candidates that met every requirement, the best by
    :data:`CHOICE_ORDER` ``[decision]`` (lexicographic; ties go to the earlier candidate); None
    when none passed."""
    order = CHOICE_ORDER[decision]
    passed = [i for i, c in enumerate(archive.candidates) if c.passed and c.error is None]
    if not passed:
        return None
    return min(passed, key=lambda i: (tuple(-sign * float(archive.candidates[i].metrics[m]) for m, sign in order), i))
