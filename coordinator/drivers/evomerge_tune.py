"""EvoMerge on Ray Tune: a custom Searcher breeds merge recipes; each candidate is a Tune trial.

:class:`GenomeSearcher` wraps :class:`phases.evomerge.evolution.Evolution` (the GA, plain
Python) in Tune's ``Searcher`` protocol: ``suggest(trial_id)`` hands out the current
generation's genomes that have no fitness yet, returns ``None`` while the generation's last
trials run (the generational barrier), and ``Searcher.FINISHED`` when the GA stops;
``on_trial_complete`` records the trial's ``fitness`` in the GA's cache and, when the
generation is complete, breeds the next one. A trial that failed after Tune's own retries
(``FailureConfig.max_failures``, which also re-runs trials lost with a node) is run again as a
new trial up to ``resubmits`` times, then scores ``-inf`` and is reported as failed, never given
an invented fitness. (Resubmitting is ours because Tune can give up on a trial lost with its node
before ``max_failures`` is spent: when two of the dead actor's calls fail, the first requeues the
trial as PENDING and the second, arriving while it is PENDING, errors it for good.)

Decisions depend only on fitness values, never on which trial finished first, so the search
is the same with 1 worker or 20 (tested against ``Evolution.run``). Only recipes are
checkpointed (``on_generation`` gets each record; the driver writes ``Evolution.state_dict``).

:func:`run_search` runs the Tuner: ``trainable(config)`` gets ``config["genome"]`` (JSON) and
must ``tune.report({"fitness": ...})``; resources per trial are declared (``{"cpu": 1}`` or a
GPU fraction), so more nodes mean more concurrent trials with no code change.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from phases.evomerge.evolution import Evolution, GenerationRecord
from phases.evomerge.genome import Genome
from phases.evomerge.steady import SteadyState

__all__ = ["GenomeSearcher", "SteadySearcher", "run_search"]


class GenomeSearcher(Searcher):
    """Tune searcher for the generational GA (see the module docstring).

    Args:
        evolution: the GA, fresh or restored from a checkpoint (``load_state_dict``).
        on_generation: called with each closed generation's record (checkpoint here).
        details: genome key -> the trial's other numeric results (objectives, fitness terms);
            filled as trials complete (pass a restored dict to keep earlier ones).
        resubmits: times a genome whose trial Tune gave up on is run again as a new trial.
    Attributes:
        failed: keys of genomes whose trials failed (crashed after Tune's retries and our
            resubmits): -inf.
        resubmitted: genome key -> times its trial was run again as a new trial.
        invalid: keys of genomes whose trial reported a non-finite fitness (a broken child,
            e.g. NaN weights): -inf as well, but not a failure of the system.
    """

    def __init__(self, evolution: Evolution, on_generation: Callable[[GenerationRecord], None] | None = None,
                 details: dict[str, dict[str, float]] | None = None, resubmits: int = 1):
        super().__init__(metric="fitness", mode="max")
        self.evo = evolution
        self._on_generation = on_generation
        self.details = details if details is not None else {}
        self.resubmits = resubmits
        self.resubmitted: dict[str, int] = {}
        if not self.evo.population:
            self.evo.initial()
        self._queue: list[Genome] = self.evo.pending()
        self._running: dict[str, Genome] = {}
        self._evaluated = 0
        self.failed: list[str] = []
        self.invalid: list[str] = []
        self.timings: list[tuple[float, str, float]] = []

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher with the Tuner (tuner.pkl); the callback (which may hold
        # the driver's tracker, locks and files) stays behind.
        state = dict(self.__dict__)
        state["_on_generation"] = None
        return state

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment checkpoint of the searcher: the GA's JSON state, never pickle."""
        from serialization.checkpoint import atomic_write_json

        atomic_write_json(checkpoint_path, {"evolution": self.evo.state_dict(), "details": self.details,
                                            "failed": self.failed, "invalid": self.invalid})

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.evo.load_state_dict(state["evolution"])
        self.details, self.failed = state["details"], list(state["failed"])
        self.invalid = list(state.get("invalid", []))
        self._reset()

    def _reset(self) -> None:
        self._queue, self._running, self._evaluated = self.evo.pending(), {}, 0

    def _resubmit(self, genome: Genome) -> None:
        """Make ``genome`` runnable again (its trial errored; a new trial will run it)."""
        self._queue.insert(0, genome)

    def _record(self, trial_id: str, result: dict | None, error: bool) -> Genome | None:
        """Put a finished trial's fitness (``-inf`` when it failed) and details in the GA.

        Returns the genome, or ``None`` when the trial is unknown or its genome was resubmitted."""
        genome = self._running.pop(trial_id, None)
        if genome is None:
            return None
        key = genome.key()
        if error and self.resubmitted.get(key, 0) < self.resubmits:
            self.resubmitted[key] = self.resubmitted.get(key, 0) + 1
            self._resubmit(genome)
            return None
        fitness = None if error or not result else result.get(self.metric)
        if fitness is None:
            self.failed.append(key)  # the trial crashed (after Tune's retries)
            fitness = float("-inf")
        elif not math.isfinite(float(fitness)):
            self.invalid.append(key)  # it ran, but the child is broken (e.g. NaN weights)
            fitness = float("-inf")
        self.evo.cache[key] = float(fitness)
        if result and isinstance(result.get("time/eval_s"), (int, float)):
            # (when the driver saw it, genome key, the trial's own merge + eval seconds):
            # timings for reports and benchmarks only, never for decisions
            self.timings.append((time.perf_counter(), key, float(result["time/eval_s"])))
        if result and not error:  # finite numbers only: the details go into JSON checkpoints
            self.details[key] = {k: float(v) for k, v in result.items()
                                 if k.startswith(("objectives/", "terms/")) and isinstance(v, (int, float))
                                 and math.isfinite(float(v))}
        return genome

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

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A trial reports once; taking its fitness here, not at completion, breeds the next
        # generation a controller step earlier, so the next trials are queued before Tune's
        # actor cache sees an idle worker with nothing queued and stops it.
        if self.metric in result:
            self.on_trial_complete(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._record(trial_id, result, error) is None:
            return  # already taken from its result, or resubmitted
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


class SteadySearcher(GenomeSearcher):
    """Tune searcher for continuous breeding (:class:`phases.evomerge.steady.SteadyState`):
    ``suggest`` hands out any bred child not yet running, so a free worker gets work at once
    unless the GA's window says the next child must wait for an older result; results are
    applied in breeding order, so the search does not depend on which trial finished first."""

    evo: SteadyState

    def __init__(self, evolution: SteadyState, on_generation: Callable[[GenerationRecord], None] | None = None,
                 details: dict[str, dict[str, float]] | None = None, resubmits: int = 1):
        Searcher.__init__(self, metric="fitness", mode="max")
        self.evo = evolution
        self._on_generation = on_generation
        self.details = details if details is not None else {}
        self.resubmits = resubmits
        self.resubmitted: dict[str, int] = {}
        self.failed: list[str] = []
        self.invalid: list[str] = []
        self.timings: list[tuple[float, str, float]] = []
        self.evo.start()
        self._reset()

    def _reset(self) -> None:
        self._running, self._inflight = {}, set()
        self._advance()

    def _advance(self) -> None:
        for record in self.evo.apply_ready():
            if self._on_generation is not None:
                self._on_generation(record)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._advance()
        if self.evo.done:
            return Searcher.FINISHED
        for _, genome in self.evo.runnable():  # a resubmitted genome is runnable again: not in flight
            if genome.key() not in self._inflight:
                self._inflight.add(genome.key())
                self._running[trial_id] = genome
                return {"genome": genome.to_json(), "key": genome.key(), "generation": self.evo.generation}
        return None  # the window: the next child waits for an older result

    def _resubmit(self, genome: Genome) -> None:
        self._inflight.discard(genome.key())

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        genome = self._record(trial_id, result, error)
        if genome is not None:
            self._inflight.discard(genome.key())
            self._advance()


def run_search(trainable: Callable[[dict], None], evolution: Evolution, *, storage_path: str | Path, name: str,
               resources: dict[str, float] | None = None, max_concurrent: int | None = None,
               max_failures: int = 2, resubmits: int = 1, on_generation: Callable[[GenerationRecord], None] | None = None,
               reuse_actors: bool = True,
               details: dict[str, dict[str, float]] | None = None,
               on_searcher: Callable[[GenomeSearcher], None] | None = None) -> tuple[Genome, float, GenomeSearcher]:
    """Run the GA with one Tune trial per candidate; returns the best genome, its fitness, the searcher.

    Args:
        trainable: a Tune function trainable reporting ``fitness``.
        evolution: the GA (fresh or restored).
        storage_path: Tune's storage (shared by every node on a cluster).
        name: the experiment's name.
        resources: per trial, e.g. ``{"cpu": 1}`` or ``{"cpu": 1, "gpu": 0.25}``.
        max_concurrent: trials at once (default: as many as the resources allow).
        max_failures: Tune's retries of a failed trial (e.g. lost with its node).
        resubmits: then, new trials for a genome whose trial Tune gave up on.
        reuse_actors: keep trial processes between trials, so parents load once per worker.
        details: see :class:`GenomeSearcher`.
        on_searcher: called with the searcher before the search starts.
    """
    # Tune's new console output prints its experiment table even at verbose=0; the legacy
    # reporter honours it. The driver logs one line per generation instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    searcher = (SteadySearcher if isinstance(evolution, SteadyState) else GenomeSearcher)(
        evolution, on_generation, details, resubmits)
    if on_searcher is not None:
        on_searcher(searcher)
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
