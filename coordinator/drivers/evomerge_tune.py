"""EvoMerge on Ray Tune: a custom Searcher breeds merge recipes; each candidate is a Tune trial.

:class:`GenomeSearcher` wraps :class:`phases.evomerge.evolution.Evolution` (the GA, plain
Python) in Tune's ``Searcher`` protocol: ``suggest(trial_id)`` hands out the current
generation's genomes that have no fitness yet, returns ``None`` while the generation's last
trials run (the generational barrier), and ``Searcher.FINISHED`` when the GA stops;
``on_trial_complete`` records the trial's ``fitness`` in the GA's cache and, when the
generation is complete, breeds the next one. A trial that failed after Tune's own retries
(``FailureConfig.max_failures``, which also re-runs trials lost with a node) scores ``-inf``
and is reported as failed, never given an invented fitness.

Decisions depend only on fitness values, never on which trial finished first, so the search
is the same with 1 worker or 20 (tested against ``Evolution.run``). Only recipes are
checkpointed (``on_generation`` gets each record; the driver writes ``Evolution.state_dict``).

:func:`run_search` runs the Tuner: ``trainable(config)`` gets ``config["genome"]`` (JSON) and
must ``tune.report({"fitness": ...})``; resources per trial are declared (``{"cpu": 1}`` or a
GPU fraction), so more nodes mean more concurrent trials with no code change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from phases.evomerge.evolution import Evolution, GenerationRecord
from phases.evomerge.genome import Genome

__all__ = ["GenomeSearcher", "run_search"]


class GenomeSearcher(Searcher):
    """Tune searcher for the generational GA (see the module docstring).

    Args:
        evolution: the GA, fresh or restored from a checkpoint (``load_state_dict``).
        on_generation: called with each closed generation's record (checkpoint here).
    Attributes:
        failed: keys of genomes whose trials failed.
    """

    def __init__(self, evolution: Evolution, on_generation: Callable[[GenerationRecord], None] | None = None):
        super().__init__(metric="fitness", mode="max")
        self.evo = evolution
        self._on_generation = on_generation
        if not self.evo.population:
            self.evo.initial()
        self._queue: list[Genome] = self.evo.pending()
        self._running: dict[str, Genome] = {}
        self._evaluated = 0
        self.failed: list[str] = []

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self._queue and not self._running:
            self._close_generation()
        if self.evo.done:
            return Searcher.FINISHED
        if not self._queue:
            return None  # the barrier: this generation's last trials are still running
        genome = self._queue.pop(0)
        self._running[trial_id] = genome
        return {"genome": genome.to_json(), "key": genome.key(), "generation": self.evo.generation}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        genome = self._running.pop(trial_id, None)
        if genome is None:
            return
        fitness = None if error or not result else result.get(self.metric)
        if fitness is None or not math.isfinite(float(fitness)):
            self.failed.append(genome.key())
            fitness = float("-inf")
        self.evo.cache[genome.key()] = float(fitness)
        self._evaluated += 1
        if not self._queue and not self._running:
            self._close_generation()

    def _close_generation(self) -> None:
        """Advance while the population is fully evaluated (elites come from the cache)."""
        while not self.evo.done and not self.evo.pending() and not self._running:
            record = self.evo.advance(self._evaluated)
            self._evaluated = 0
            if self._on_generation is not None:
                self._on_generation(record)
        self._queue = [] if self.evo.done else self.evo.pending()


def run_search(trainable: Callable[[dict], None], evolution: Evolution, *, storage_path: str | Path, name: str,
               resources: dict[str, float] | None = None, max_concurrent: int | None = None,
               max_failures: int = 2, on_generation: Callable[[GenerationRecord], None] | None = None,
               reuse_actors: bool = True) -> tuple[Genome, float, GenomeSearcher]:
    """Run the GA with one Tune trial per candidate; returns the best genome, its fitness, the searcher.

    Args:
        trainable: a Tune function trainable reporting ``fitness``.
        evolution: the GA (fresh or restored).
        storage_path: Tune's storage (shared by every node on a cluster).
        name: the experiment's name.
        resources: per trial, e.g. ``{"cpu": 1}`` or ``{"cpu": 1, "gpu": 0.25}``.
        max_concurrent: trials at once (default: as many as the resources allow).
        max_failures: Tune's retries of a failed trial (e.g. lost with its node).
        reuse_actors: keep trial processes between trials, so parents load once per worker.
    """
    searcher = GenomeSearcher(evolution, on_generation)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources or {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=max_concurrent,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(storage_path).resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    tuner.fit()
    if evolution.best is None:
        raise RuntimeError("the search ended before any generation closed")
    return evolution.best, evolution.best_fitness, searcher
