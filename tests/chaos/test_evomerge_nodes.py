"""EvoMerge's Tune search on a 3-node Ray cluster (a head without CPUs, two 1-CPU workers):
trials run on both workers at once, and when a worker node dies mid-generation its trials run
again on the other one and the search ends exactly where the plain GA does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import tune

from cluster.connect import connect
from cluster.local import LocalCluster
from coordinator.drivers.evomerge_tune import run_search
from phases.evomerge.evolution import Evolution, EvolutionConfig
from tests.cluster.conftest import fresh_driver, unauthenticated_local_cluster  # noqa: F401 - fresh_driver is a fixture
from tests.coordinator.test_evomerge_tune import synthetic_fitness

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("fresh_driver")]

MiB = 1024 * 1024
CFG = EvolutionConfig(population=6, groups=1, max_generations=2, patience=2)


def slow_trial(config: dict, marks: str) -> None:
    """Says which node it started on (a file in a folder every node shares), works 0.8 s, reports."""
    import ray

    from phases.evomerge.genome import Genome

    node = ray.get_runtime_context().get_node_id()
    (Path(marks) / f"{config['key'][:12]}-{node}").touch()
    time.sleep(0.8)
    tune.report({"fitness": synthetic_fitness(Genome.from_json(config["genome"]))})


@pytest.fixture
def two_workers() -> Iterator[LocalCluster]:
    with unauthenticated_local_cluster(num_nodes=3, cpus_per_node=1, head_cpus=0, object_store_memory=80 * MiB) as lc:
        yield lc


def test_a_node_lost_mid_generation_its_trials_run_elsewhere_and_the_search_completes(two_workers, tmp_path):
    connect(two_workers.address)
    marks = tmp_path / "marks"
    marks.mkdir()
    victim: list = []  # [node id, time it was removed]

    def kill_the_first_busy_node() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            started = sorted(marks.iterdir(), key=lambda p: p.stat().st_mtime)
            if started:
                node_id = started[0].name.rsplit("-", 1)[1]
                time.sleep(0.3)  # the trial is 0.3 s into its 0.8 s of work
                two_workers.remove_node(next(n for n in two_workers.worker_nodes if n.node_id == node_id))
                victim.extend([node_id, time.time()])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_busy_node, daemon=True)
    killer.start()
    plain = Evolution(CFG, n_models=3, seed=4)
    best_plain, fit_plain = plain.run(lambda gs: [synthetic_fitness(g) for g in gs])
    evo = Evolution(CFG, n_models=3, seed=4)
    best, fit, searcher = run_search(tune.with_parameters(slow_trial, marks=str(marks)), evo,
                                     storage_path=tmp_path / "tune", name="nodes", resources={"cpu": 1},
                                     max_failures=3)
    killer.join(timeout=5)
    assert victim, "a worker node was removed while it ran a trial"
    victim_id, killed_at = victim
    starts = [(p.stat().st_mtime, p.name.rsplit("-", 1)[1]) for p in marks.iterdir()]
    assert any(node == victim_id for _, node in starts), "trials ran on the removed node"
    after = [node for t, node in starts if t > killed_at]
    assert after and victim_id not in after, "after the removal, every trial (retries included) ran on the other worker"
    assert not searcher.failed, "lost trials were retried, not scored as failures"
    assert (best.key(), fit) == (best_plain.key(), fit_plain)
    assert [r.best_key for r in evo.history] == [r.best_key for r in plain.history]
