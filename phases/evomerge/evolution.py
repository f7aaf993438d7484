"""The genetic algorithm over merge recipes: generations, elitism, diversity, early stopping.

Hyperparameters are the reference analysis' (:class:`EvolutionConfig`). One generation:

1. score = fitness + ``diversity_weight`` x novelty, novelty being a genome's mean distance
   (:func:`phases.evomerge.genome.diversity`'s measure) to the rest of the population: crowded
   genomes are less likely to be picked as parents;
2. the ``elitism`` fittest genomes (by fitness alone) survive unchanged;
3. the rest are children: two tournament winners (size ``tournament``), crossover, mutation;
4. if the new population's diversity is below ``min_diversity``, children are replaced by
   random genomes (immigrants), last first, until it is not or only elites are left.

The first population holds one genome per parent that reproduces it exactly (``linear`` with a
one-hot weight), so with elitism the best genome can never score below the best parent, and
random genomes for the rest. Fitness is cached by genome key: an elite or a re-bred duplicate is
never evaluated twice. The run stops after ``max_generations`` or when the best fitness has not
improved for ``patience`` generations.

:meth:`Evolution.breed_one` gives one child from the current population for the continuous
(steady-state) mode, where a worker that finishes asks for the next candidate at once instead
of waiting for its generation. Everything random comes from one seeded ``random.Random``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field

from phases.data.config import FrozenConfig
from phases.evomerge.genome import EVOLVABLE, Genome, crossover, diversity, mutate, random_genome, tournament

__all__ = ["Evolution", "EvolutionConfig", "GenerationRecord", "identity_layout", "parent_genome"]


class EvolutionConfig(FrozenConfig):
    """The search's hyperparameters (defaults from the reference analysis)."""

    population: int = Field(8, ge=2)
    tournament: int = Field(3, ge=1)
    elitism: int = Field(2, ge=0)
    crossover_rate: float = Field(0.7, ge=0, le=1)
    mutation_rate: float = Field(0.1, ge=0, le=1)
    mutation_strength: float = Field(0.05, ge=0)
    diversity_weight: float = Field(0.3, ge=0)
    min_diversity: float = Field(0.2, ge=0)
    patience: int = Field(5, ge=1)  # generations without improvement before stopping
    max_generations: int = Field(50, ge=1)
    groups: int = Field(4, ge=1)  # layer groups with their own coefficients
    # Layer layouts (frankenmerge / DFS) in the genome: the number of times the path may pass
    # through the sources' layers (Akiba et al.'s r); 0 = parameter-space merging only.
    dfs_repeats: int = Field(0, ge=0, le=8)
    methods: tuple[str, ...] = EVOLVABLE


def identity_layout(n_models: int, layers: int, repeats: int) -> tuple[int, ...]:
    """The layout bits of the merge's own layers in order (none when ``repeats`` is 0)."""
    if not repeats or layers < 1:
        return ()
    size = repeats * (n_models + 1) * layers
    return tuple(1 if j < layers else 0 for j in range(size))


def parent_genome(index: int, n_models: int, groups: int, base: int = 0, layout: tuple[int, ...] = ()) -> Genome:
    """The genome that reproduces parent ``index`` exactly: linear with weight 1 on it (and the
    identity ``layout`` when layouts are searched)."""
    row = tuple(1.0 if m == index else 0.0 for m in range(n_models))
    return Genome(method="linear", base=base, weights=(row,) * (groups + 1),
                  densities=((1.0,) * n_models,) * (groups + 1), t=(0.5,) * (groups + 1), config_from=index,
                  layout=layout)


@dataclass
class GenerationRecord:
    """One generation's summary (the ``evomerge/*`` metrics)."""

    generation: int
    best_fitness: float
    mean_fitness: float
    diversity: float
    best_key: str
    evaluated: int  # genomes newly evaluated (not from the cache)
    immigrants: int


@dataclass
class Evolution:
    """The GA's state: config, random source, fitness cache, history and where the search is.

    Drive it with :meth:`run` (a loop that calls ``evaluate`` per generation), or step by step
    as a Tune searcher does: :meth:`initial`, evaluate, put fitness in :attr:`cache`,
    :meth:`advance`, repeat. :meth:`state_dict` is plain JSON data (genomes, not weights).
    """

    cfg: EvolutionConfig
    n_models: int
    seed: int
    base: int = 0
    layers: int = 0  # the models' layer-stack depth (needed when cfg.dfs_repeats > 0)
    cache: dict[str, float] = field(default_factory=dict)
    history: list[GenerationRecord] = field(default_factory=list)
    # genome key -> how it was made, the first time it was: {"generation", "op", "parents"
    # (keys), "genome"}; op is "parent" (with "model"), "random", "immigrant", or "crossover"
    # / "mutation" / "crossover+mutation" / "copy".
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.generation = 0
        self.best: Genome | None = None
        self.best_fitness = float("-inf")
        self.stale = 0
        self.population: list[Genome] = []
        self.identity = identity_layout(self.n_models, self.layers, self.cfg.dfs_repeats)
        if self.cfg.dfs_repeats and self.layers < 1:
            raise ValueError("dfs_repeats > 0 needs the models' layer count (Evolution(layers=...))")

    def _note(self, genome: Genome, op: str, parents: Sequence[Genome] = (), **extra: Any) -> Genome:
        self.lineage.setdefault(genome.key(), {"generation": self.generation, "op": op,
                                               "parents": [p.key() for p in parents], "genome": genome.to_json(),
                                               **extra})
        return genome

    def _random(self, op: str = "random") -> Genome:
        genome = random_genome(self.rng, self.n_models, self.cfg.groups, base=self.base, methods=self.cfg.methods,
                               layout=self.identity)
        return self._note(genome, op)

    def initial(self) -> list[Genome]:
        """The parents' own genomes, then random ones, ``population`` in all (the current population)."""
        pop = [self._note(parent_genome(i, self.n_models, self.cfg.groups, self.base, self.identity), "parent", model=i)
               for i in range(self.n_models)]
        pop = pop[: self.cfg.population]
        while len(pop) < self.cfg.population:
            pop.append(self._random())
        self.population = pop
        return pop

    def ancestry(self, key: str) -> list[dict[str, Any]]:
        """The lineage of genome ``key``: it and every ancestor back to the first population,
        each ``{"key", "generation", "op", "parents", "fitness", "genome"}``, newest first."""
        out, seen, todo = [], set(), [key]
        while todo:
            k = todo.pop(0)
            if k in seen or k not in self.lineage:
                continue
            seen.add(k)
            node = self.lineage[k]
            fit = self.cache.get(k)
            out.append({"key": k, **node, "fitness": fit if fit is None or math.isfinite(fit) else None})
            todo.extend(node["parents"])
        return out

    def pending(self) -> list[Genome]:
        """The current population's genomes not evaluated yet (each key once)."""
        return list({g.key(): g for g in self.population if g.key() not in self.cache}.values())

    @property
    def done(self) -> bool:
        return self.generation >= self.cfg.max_generations or self.stale >= self.cfg.patience

    def _scores(self, pop: Sequence[Genome], fit: Sequence[float]) -> list[float]:
        if len(pop) < 2 or not self.cfg.diversity_weight:
            return list(fit)
        novelty = [sum(diversity([g, h]) for j, h in enumerate(pop) if j != i) / (len(pop) - 1) for i, g in enumerate(pop)]
        return [f + self.cfg.diversity_weight * n for f, n in zip(fit, novelty)]

    def breed_one(self, pop: Sequence[Genome], fit: Sequence[float]) -> Genome:
        """One child of two tournament winners (crossover, then mutation)."""
        scores = self._scores(pop, fit)
        a = tournament(self.rng, pop, scores, self.cfg.tournament)
        b = tournament(self.rng, pop, scores, self.cfg.tournament)
        crossed = crossover(self.rng, a, b, self.cfg.crossover_rate)
        child = mutate(self.rng, crossed, self.cfg.mutation_rate, self.cfg.mutation_strength, self.cfg.methods)
        ops = (["crossover"] if crossed is not a else []) + (["mutation"] if child != crossed else [])
        return self._note(child, "+".join(ops) or "copy", [a, b] if crossed is not a else [a])

    def next_generation(self, pop: Sequence[Genome], fit: Sequence[float]) -> tuple[list[Genome], int]:
        """The next population and how many immigrants it took to keep diversity up."""
        order = sorted(range(len(pop)), key=lambda i: (-fit[i], i))
        elites = [pop[i] for i in order[: self.cfg.elitism]]
        children = [self.breed_one(pop, fit) for _ in range(self.cfg.population - len(elites))]
        immigrants = 0
        for i in range(len(children) - 1, -1, -1):
            if diversity(elites + children) >= self.cfg.min_diversity:
                break
            children[i] = self._random("immigrant")
            immigrants += 1
        return elites + children, immigrants

    def advance(self, evaluated: int = 0) -> GenerationRecord:
        """Close the current generation (every genome's fitness in :attr:`cache`): record it,
        update the best and the early-stopping count, and breed the next population.

        Raises:
            KeyError: a genome of the population has no fitness yet.
        """
        pop = self.population
        fit = [self.cache[g.key()] for g in pop]
        i_best = max(range(len(pop)), key=lambda i: (fit[i], -i))
        if fit[i_best] > self.best_fitness + 1e-12:
            self.best, self.best_fitness, self.stale = pop[i_best], fit[i_best], 0
        else:
            self.stale += 1
        finite = [f for f in fit if math.isfinite(f)]  # failed candidates (-inf) do not drag the mean
        mean = sum(finite) / len(finite) if finite else float("-inf")
        record = GenerationRecord(self.generation, fit[i_best], mean, diversity(pop),
                                  pop[i_best].key(), evaluated, 0)
        self.history.append(record)
        self.generation += 1
        self.population, record.immigrants = self.next_generation(pop, fit)
        return record

    def run(self, evaluate: Callable[[list[Genome]], list[float]],
            on_generation: Callable[[GenerationRecord], None] | None = None) -> tuple[Genome, float]:
        """Evolve until ``max_generations`` or ``patience``; returns the best genome and its fitness.

        Continues from the current state when there is one (after :meth:`load_state_dict`).

        Args:
            evaluate: fitness of each genome not in the cache (higher is better); called once
                per generation with the genomes to evaluate, so it may run them in parallel.
            on_generation: called after each generation (checkpoint :meth:`state_dict` here).
        """
        if not self.population:
            self.initial()
        while not self.done:
            todo = self.pending()
            for g, f in zip(todo, evaluate(todo)):
                self.cache[g.key()] = float(f)
            record = self.advance(len(todo))
            if on_generation is not None:
                on_generation(record)
        assert self.best is not None  # at least one generation ran, or the state was loaded with one
        return self.best, self.best_fitness

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (plain JSON data)."""
        version, internal, gauss = self.rng.getstate()
        return {"seed": self.seed, "generation": self.generation, "stale": self.stale,
                "best": self.best.to_json() if self.best else None, "best_fitness": self.best_fitness if self.best else None,
                "population": [g.to_json() for g in self.population],
                # a failed candidate's -inf is not JSON: stored as null
                "cache": {k: (v if math.isfinite(v) else None) for k, v in self.cache.items()},
                "history": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in asdict(r).items()} for r in self.history], "rng": [version, list(internal), gauss],
                "lineage": self.lineage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generation, self.stale = int(state["generation"]), int(state["stale"])
        self.best = Genome.from_json(state["best"]) if state["best"] else None
        self.best_fitness = float(state["best_fitness"]) if state["best_fitness"] is not None else float("-inf")
        self.population = [Genome.from_json(g) for g in state["population"]]
        self.cache = {k: float(v) if v is not None else float("-inf") for k, v in state["cache"].items()}
        self.history = [GenerationRecord(**{k: float("-inf") if v is None else v for k, v in r.items()})
                        for r in state["history"]]
        self.lineage = dict(state.get("lineage", {}))
