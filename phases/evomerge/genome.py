"""The EvoMerge genome and its variation operators (selection, crossover, mutation, diversity).

A :class:`Genome` is a merge recipe: the operator (one of the merge methods that combine two or
more models), and per layer group the per-model ``weight`` and ``density`` and the ``t`` of
slerp. Layer groups split a model's decoder layers into ``groups`` contiguous blocks; tensors
outside the layers (embeddings, final norm, head) form one more group, the last. The genome also
says which model's config the child takes (``config_from``) and, when layouts are searched, the
layer layout: DFS indicator bits over the parameter-space merge and the models' layers
(``phases.evomerge.layout``; a frankenmerge is a layout whose path runs in contiguous slices).
So one genome covers the operator, its per-layer-group coefficients and the layer layout.

Variation, with the reference's hyperparameters as defaults (``EvolutionConfig`` in the
driver): tournament selection (size 3), crossover with probability 0.7 (uniform per gene, the
operator taken from either parent), mutation of each gene with probability 0.1 by Gaussian
noise of standard deviation 0.05 (the operator is resampled with the same probability), values
clamped to their ranges. Diversity is the mean pairwise L1 distance between genomes' gene
vectors, plus 1 for each pair with different operators, divided by the genes per genome.

All randomness comes from a ``random.Random`` the caller seeds, so a run replays under a seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from phases.evomerge.errors import MergeError

__all__ = ["EVOLVABLE", "Genome", "crossover", "diversity", "layer_group", "mutate", "random_genome", "tournament"]

# Operators a genome may choose: those that combine two or more models with coefficients.
EVOLVABLE: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_WEIGHT_RANGE, _DENSITY_RANGE, _T_RANGE = (0.0, 1.0), (0.1, 1.0), (0.0, 1.0)


def layer_group(name: str, num_layers: int, groups: int) -> int:
    """The layer group of tensor ``name``: decoder layer i of ``num_layers`` falls in group
    ``i * groups // num_layers``; anything else (embeddings, final norm, head) in group ``groups``."""
    m = _LAYER_RE.search(name)
    if m is None:
        return groups
    return min(groups - 1, int(m.group(1)) * groups // max(1, num_layers))


@dataclass(frozen=True)
class Genome:
    """A merge recipe over ``n_models`` models with ``groups`` layer groups (+1 for the rest).

    Attributes:
        method: one of :data:`EVOLVABLE`.
        weights: per group (groups + 1), per model: the merge weight (for task-vector methods
            the base model's entry is unused).
        densities: per group, per model: the kept fraction (ties/dare; unused otherwise).
        t: per group: slerp's interpolation from the base (unused otherwise).
        base: index of the base model (task-vector methods and slerp).
        config_from: index of the model whose config (not weights) the child takes: models of
            one family may differ in settings that are not tensors (a Cognate variant's ACT
            threshold, whether its memory is on), so the child's settings are a gene too.
        layout: the layer layout (DFS indicator bits, :func:`phases.evomerge.layout.path_from_bits`)
            over the sources (0 = this genome's parameter-space merge, 1.. = the models) x
            their layers x repeats; empty = the merge's own layers in order.
    """

    method: str
    weights: tuple[tuple[float, ...], ...]
    densities: tuple[tuple[float, ...], ...]
    t: tuple[float, ...]
    base: int = 0
    config_from: int = 0
    layout: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in EVOLVABLE:
            raise MergeError(f"genome method {self.method!r} is not evolvable; choose from {', '.join(EVOLVABLE)}",
                             [("method", f"not evolvable: {self.method!r}")])
        shapes = {len(self.weights), len(self.densities), len(self.t)}
        widths = {len(row) for row in (*self.weights, *self.densities)}
        if len(shapes) != 1 or len(widths) != 1:
            raise MergeError("genome rows disagree: weights, densities and t need one row per group and one "
                             "value per model", [("genome", "ragged")])
        if not 0 <= self.config_from < len(self.weights[0]) or not 0 <= self.base < len(self.weights[0]):
            raise MergeError(f"genome base {self.base} / config_from {self.config_from} is not a model index "
                             f"(0..{len(self.weights[0]) - 1})", [("genome", "index out of range")])
        if self.layout and (not any(self.layout) or any(b not in (0, 1) for b in self.layout)):
            raise MergeError("a genome layout is 0/1 bits with at least one layer on", [("layout", "bits")])

    @property
    def groups(self) -> int:
        """Layer groups, not counting the last (non-layer) group."""
        return len(self.t) - 1

    @property
    def n_models(self) -> int:
        return len(self.weights[0])

    def genes(self) -> list[float]:
        """The coefficient vector (weights, densities, t), for distances."""
        return [*itertools.chain.from_iterable(self.weights), *itertools.chain.from_iterable(self.densities), *self.t,
                *map(float, self.layout)]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base, "config_from": self.config_from, "layout": list(self.layout),
                "weights": [list(r) for r in self.weights],
                "densities": [list(r) for r in self.densities], "t": list(self.t)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Genome:
        return cls(method=str(data["method"]), base=int(data["base"]), config_from=int(data.get("config_from", 0)),
                   weights=tuple(tuple(float(v) for v in r) for r in data["weights"]),
                   densities=tuple(tuple(float(v) for v in r) for r in data["densities"]),
                   t=tuple(float(v) for v in data["t"]), layout=tuple(int(b) for b in data.get("layout", ())))

    def key(self) -> str:
        """sha256 of the canonical JSON (values rounded to 1e-9): the fitness cache's key."""
        canon = json.dumps(self.to_json(), sort_keys=True, default=lambda v: round(v, 9))
        return hashlib.sha256(canon.encode()).hexdigest()

    def parameters_for(self, group: int) -> dict[str, Any]:
        """``phases.evomerge.merge`` parameters of one layer group (mergekit's names)."""
        if self.method == "slerp":
            return {"t": self.t[group]}
        params: dict[str, Any] = {"weight": list(self.weights[group])}
        if self.method in ("ties", "dare_ties", "dare_linear"):
            params["density"] = list(self.densities[group])
        return params

    def per_tensor(self, num_layers: int) -> Callable[[str], dict[str, Any]]:
        """``name -> parameters`` for ``merge(per_tensor=...)``."""
        return lambda name: self.parameters_for(layer_group(name, num_layers, self.groups))


def _clamp(v: float, lo_hi: tuple[float, float]) -> float:
    return min(lo_hi[1], max(lo_hi[0], v))


def _nonempty(bits: tuple[int, ...]) -> tuple[int, ...]:
    return bits if not bits or any(bits) else (1, *bits[1:])


def random_genome(rng: random.Random, n_models: int, groups: int, *, base: int = 0,
                  methods: Sequence[str] = EVOLVABLE, layout: Sequence[int] = (), layout_flip: float = 0.1) -> Genome:
    """A uniformly random genome (slerp only when there are exactly two models). Its layout,
    when ``layout`` (the identity layout's bits) is given, is the identity with each bit flipped
    with probability ``layout_flip``: a random path through every layer of every model would be
    a broken model, so search starts near the working one (as Akiba et al. initialise DFS)."""
    choices = [m for m in methods if m != "slerp" or n_models == 2]
    rows = groups + 1
    genome = Genome(method=rng.choice(choices), base=base,
                    weights=tuple(tuple(rng.uniform(*_WEIGHT_RANGE) for _ in range(n_models)) for _ in range(rows)),
                    densities=tuple(tuple(rng.uniform(*_DENSITY_RANGE) for _ in range(n_models)) for _ in range(rows)),
                    t=tuple(rng.uniform(*_T_RANGE) for _ in range(rows)), config_from=rng.randrange(n_models))
    if not layout:
        return genome
    bits = _nonempty(tuple(1 - b if rng.random() < layout_flip else b for b in layout))
    return dataclasses.replace(genome, layout=bits)


def tournament(rng: random.Random, population: Sequence[Genome], fitness: Sequence[float], size: int = 3) -> Genome:
    """The fittest of ``size`` genomes drawn without replacement (higher fitness is better)."""
    picks = rng.sample(range(len(population)), min(size, len(population)))
    return population[max(picks, key=lambda i: (fitness[i], -i))]


def crossover(rng: random.Random, a: Genome, b: Genome, rate: float = 0.7) -> Genome:
    """With probability ``rate``, a child taking each gene (and the operator) from a or b at
    random; otherwise a copy of ``a``."""
    if rng.random() >= rate:
        return a

    def mix(ra: Sequence[Sequence[float]], rb: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(x if rng.random() < 0.5 else y for x, y in zip(r1, r2)) for r1, r2 in zip(ra, rb))

    child = Genome(method=a.method if rng.random() < 0.5 else b.method, base=a.base,
                   weights=mix(a.weights, b.weights), densities=mix(a.densities, b.densities),
                   t=tuple(x if rng.random() < 0.5 else y for x, y in zip(a.t, b.t)),
                   config_from=a.config_from if rng.random() < 0.5 else b.config_from)
    if a.layout and len(a.layout) == len(b.layout):
        child = dataclasses.replace(child, layout=_nonempty(tuple(x if rng.random() < 0.5 else y
                                                                  for x, y in zip(a.layout, b.layout))))
    return child


def mutate(rng: random.Random, g: Genome, rate: float = 0.1, strength: float = 0.05,
           methods: Sequence[str] = EVOLVABLE) -> Genome:
    """Each gene, with probability ``rate``, gets Gaussian noise of std ``strength`` (clamped to
    its range); the operator is resampled with the same probability."""
    def jitter(v: float, lo_hi: tuple[float, float]) -> float:
        return _clamp(v + rng.gauss(0.0, strength), lo_hi) if rng.random() < rate else v

    method = g.method
    if rng.random() < rate:
        method = rng.choice([m for m in methods if m != "slerp" or g.n_models == 2])
    weights = tuple(tuple(jitter(v, _WEIGHT_RANGE) for v in r) for r in g.weights)
    densities = tuple(tuple(jitter(v, _DENSITY_RANGE) for v in r) for r in g.densities)
    t = tuple(jitter(v, _T_RANGE) for v in g.t)
    # Drawn after the coefficients, so adding this gene left their random stream unchanged.
    config_from = rng.randrange(g.n_models) if rng.random() < rate else g.config_from
    layout = _nonempty(tuple(1 - b if rng.random() < rate else b for b in g.layout))
    return Genome(method=method, base=g.base, weights=weights, densities=densities, t=t, config_from=config_from,
                  layout=layout)


def diversity(population: Sequence[Genome]) -> float:
    """Mean pairwise distance: L1 over genes plus 1 per differing operator or config source,
    per gene (0 = clones)."""
    if len(population) < 2:
        return 0.0
    total, pairs = 0.0, 0
    for a, b in itertools.combinations(population, 2):
        ga, gb = a.genes(), b.genes()
        total += (sum(abs(x - y) for x, y in zip(ga, gb)) + (a.method != b.method)
                  + (a.config_from != b.config_from)) / (len(ga) + 2)
        pairs += 1
    return total / pairs
