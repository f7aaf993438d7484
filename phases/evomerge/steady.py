"""Continuous breeding: a steady-state GA with no generation barrier, deterministic under a seed.

In the generational GA every worker waits for the slowest trial of its generation (mergekit
issue #532's idle GPUs). Here a child is bred as soon as a worker could take it, under one rule
that keeps the search independent of timing: child ``i`` (numbered in breeding order) is bred
from the archive as it stands after exactly ``max(P, i - window + 1)`` children have been
*applied*, and children are applied in their numbering order, whatever order their trials
finish in. So at most ``window`` trials run at once, a worker idles only when a trial ``window``
places back is still running, and the same seed gives the same search with 1 worker or 50.
``window`` is configuration, never the cluster's size (default: the population).

Applying child ``i`` (its fitness known): it joins the archive (size ``population``) while the
archive is not full, else replaces the worst member if it is fitter (M2N2's steady state;
elitism is implicit). A child is an immigrant (a random genome) when the archive's diversity is
below ``min_diversity``, else tournament + crossover + mutation as in the generational GA.
Every ``population`` applied children close an *epoch*, the unit of ``max_generations``,
``patience`` and the ``evomerge/*`` history, as a generation is in the generational mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from phases.evomerge.evolution import Evolution, GenerationRecord
from phases.evomerge.genome import Genome, diversity

__all__ = ["SteadyState"]


@dataclass
class SteadyState(Evolution):
    """The steady-state GA's state. Drive it: :meth:`start`; dispatch :meth:`runnable`
    children; put each finished child's fitness in :attr:`cache` and call :meth:`apply_ready`
    (which breeds whatever the rule now allows); stop when :attr:`done`.

    Attributes:
        children: every child bred so far, in breeding order (the first ``population`` are the
            initial population).
        applied: how many children have been applied to the archive.
        population: the archive.
    """

    window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        self.children: list[Genome] = []
        self.fresh: list[bool] = []  # per child: its genome was new when bred (needs a trial)
        self.applied = 0
        self._epoch = {"evaluated": 0, "immigrants": 0, "improved": False}

    def start(self) -> None:
        """The initial population as the first children; the archive starts empty."""
        if not self.children:
            for g in self.initial():
                self._add(g)
            self.population = []

    def _add(self, child: Genome) -> None:
        key = child.key()
        self.fresh.append(key not in self.cache and all(g.key() != key for g in self.children))
        self.children.append(child)

    def _limit(self) -> int:
        """How many children may exist now (child i >= P needs max(2, i - window + 1) applied)."""
        p = self.cfg.population
        return p if self.applied < 2 else max(p, self.applied + self.window)

    def _breed(self) -> None:
        while not self.done and len(self.children) < self._limit():
            fit = [self.cache[g.key()] for g in self.population]
            if len(self.population) < 2 or diversity(self.population) < self.cfg.min_diversity:
                child = self._random("immigrant")
                self._epoch["immigrants"] += 1
            else:
                child = self.breed_one(self.population, fit)
            self._add(child)

    def runnable(self) -> list[tuple[int, Genome]]:
        """Children bred and not applied yet whose fitness is unknown: what to evaluate."""
        return [(i, g) for i, g in enumerate(self.children[self.applied:], start=self.applied)
                if g.key() not in self.cache]

    def apply_ready(self) -> list[GenerationRecord]:
        """Apply, in order, every next child whose fitness is in :attr:`cache`, breeding after
        each as the rule allows; returns the epochs closed on the way."""
        closed = []
        while not self.done and self.applied < len(self.children) and self.children[self.applied].key() in self.cache:
            self._epoch["evaluated"] += int(self.fresh[self.applied])
            self._apply(self.children[self.applied])
            self.applied += 1
            if self.applied % self.cfg.population == 0:
                closed.append(self._close_epoch())
            self._breed()
        return closed

    def _apply(self, child: Genome) -> None:
        f = self.cache[child.key()]
        if f > self.best_fitness + 1e-12:
            self.best, self.best_fitness = child, f
            self._epoch["improved"] = True
        if any(g.key() == child.key() for g in self.population):
            return
        if len(self.population) < self.cfg.population:
            self.population.append(child)
            return
        fit = [self.cache[g.key()] for g in self.population]
        worst = min(range(len(fit)), key=lambda i: (fit[i], -i))
        if f > fit[worst]:
            self.population[worst] = child

    def _close_epoch(self) -> GenerationRecord:
        pop = self.population
        fit = [self.cache[g.key()] for g in pop]
        i_best = max(range(len(pop)), key=lambda i: (fit[i], -i))
        self.stale = 0 if self._epoch["improved"] else self.stale + 1
        finite = [f for f in fit if math.isfinite(f)]
        record = GenerationRecord(self.generation, fit[i_best], sum(finite) / len(finite) if finite else float("-inf"),
                                  diversity(pop), pop[i_best].key(), int(self._epoch["evaluated"]),
                                  int(self._epoch["immigrants"]))
        self.history.append(record)
        self.generation += 1
        self._epoch = {"evaluated": 0, "immigrants": 0, "improved": False}
        return record

    def run_sequential(self, evaluate, order=None) -> tuple[Genome, float]:
        """Evaluate runnable children one batch at a time (``order`` may shuffle the batch's
        completion order, as a cluster would): for tests and a laptop without Ray."""
        self.start()
        self._breed()
        while not self.done:
            todo = self.runnable()
            if not todo:
                raise RuntimeError("no runnable child although the search is not done")
            finished = list(todo) if order is None else order(list(todo))
            for _, g in finished:
                self.cache[g.key()] = float(evaluate(g))
                self.apply_ready()
        assert self.best is not None
        return self.best, self.best_fitness

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"children": [g.to_json() for g in self.children], "fresh": self.fresh, "applied": self.applied,
                      "window": self.window, "epoch": dict(self._epoch)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.children = [Genome.from_json(g) for g in state["children"]]
        self.fresh = [bool(f) for f in state["fresh"]]
        self.applied, self.window, self._epoch = int(state["applied"]), int(state["window"]), dict(state["epoch"])
