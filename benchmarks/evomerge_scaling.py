"""Benchmark: one EvoMerge generation on a local 2-node Ray cluster with 1 and with 2 workers.

Side by side in one run, on the same parents and the same genomes (the GA is deterministic,
so generation 1 holds the same candidates in every setting):

- direct: generation 1's candidates merged and evaluated in this process, one after another,
  parents loaded beforehand (no Ray, no Tune): the work itself, ``e`` seconds per candidate;
- Tune, 1 worker: the search as Tune trials (``run_search``, ``max_concurrent=1``) on a
  ``cluster.LocalCluster`` of two worker nodes with 1 CPU each (the head has none);
- Tune, 2 workers: the same with ``max_concurrent=2``, one trial per node at a time.

Generation 0 starts the workers (a process, imports, the parents loaded once per worker);
generation 1 is the one compared: the wall time from generation 0's close to generation 1's.
Printed: each setting's generation-1 wall time and its start-up (generation 0), the speedup
2 workers / 1 worker on generation 1 (target >= 1.8x on 2 cores), and Tune's overhead per
trial: the 1-worker generation's wall time minus the seconds its trials spent merging and
evaluating (timed inside each trial), per trial (scheduling, trial start, result handling).

Usage: python benchmarks/evomerge_scaling.py [--json] [--trials 12] [--d-model 128] [--layers 4]
       [--eval-batches 8] [--tasks 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # the local cluster's nodes inherit it
os.environ.pop("RAY_ADDRESS", None)


def make_parents(root: Path, d_model: int, layers: int) -> list[str]:
    """A base model and two 'fine-tunes' of it (the base plus seeded noise), as HF dirs."""
    import torch

    from phases.cognate import CognateConfig
    from phases.cognate.modeling import CognateForCausalLM
    from phases.cognate.train import build_model_config, save_model_dir
    from phases.data import DataConfig, load_corpus

    cfg = CognateConfig(target_params=None, vocab_size=None, d_model=d_model, n_layers=layers, n_heads=4,
                        d_ff=None, memory_slots=32, memory_chunk=16, max_seq_len=128, batch_size=8)
    corpus = load_corpus(DataConfig(seq_len=64), seed=0)
    torch.manual_seed(0)
    base = CognateForCausalLM(build_model_config(cfg, corpus.tokenizer))
    dirs = []
    for i in range(3):
        model = CognateForCausalLM(base.config)
        model.load_state_dict(base.state_dict())
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        dirs.append(str(save_model_dir(model, corpus.tokenizer, root / f"p{i}")))
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trials", type=int, default=10, help="new candidates per generation")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 8 windows per candidate")
    ap.add_argument("--tasks", type=int, default=64, help="generated tasks per candidate")
    ap.add_argument("--modes", default="generational,continuous", help="comma-separated search modes")
    args = ap.parse_args()

    import ray
    import torch
    from ray import tune

    from cluster.local import LocalCluster
    from coordinator.drivers.evomerge_trial import evaluate_genome, measure_parents, trial
    from coordinator.drivers.evomerge_tune import run_search
    from phases.data import DataConfig
    from phases.evomerge.evolution import Evolution, EvolutionConfig, parent_genome
    from phases.evomerge.fitness import Objectives, composite, reference
    from phases.evomerge.steady import SteadyState
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-scaling-"))
    parents = make_parents(tmp / "parents", args.d_model, args.layers)
    setup = {"parents": parents, "data": DataConfig(seq_len=64).model_dump(mode="json"), "seed": 0,
             "eval": {"batch_size": 8, "max_batches": args.eval_batches, "tasks": args.tasks}, "threads": 1}
    measured = measure_parents(setup)
    ref = reference([Objectives(**o) for o in measured["objectives"]])
    setup["reference"] = ref.to_json()
    cfg = EvolutionConfig(population=3 + args.trials, groups=2, max_generations=3, patience=3)
    measured_gen = 2  # generation 0 starts the workers; 2 is past any start-up effect

    def fresh(mode: str) -> Evolution:
        if mode == "continuous":
            evo: Evolution = SteadyState(cfg, n_models=3, seed=1, window=cfg.population)
            evo.start()
        else:
            evo = Evolution(cfg, n_models=3, seed=1)
            evo.initial()
        for i, obj in enumerate(measured["objectives"]):  # as the phase does: parents are not trials
            evo.cache[parent_genome(i, 3, cfg.groups).key()] = composite(Objectives(**obj), ref)[0]
        return evo

    def score(genome) -> float:
        f = evaluate_genome(genome.to_json(), setup)["fitness"]
        return f if math.isfinite(f) else float("-inf")  # a broken child scores -inf, as in Tune

    # Direct: the same searches in this process, one candidate after another, timed per generation.
    direct: dict[str, dict] = {}
    modes = args.modes.split(",")
    for mode in modes:
        evo = fresh(mode)
        if mode == "continuous":
            times: list[float] = []
            t_prev = time.perf_counter()
            evo.apply_ready()  # the parents' children: scored beforehand
            while not evo.done:
                _, g = evo.runnable()[0]
                evo.cache[g.key()] = score(g)
                if evo.apply_ready():  # an epoch closed
                    times.append(time.perf_counter() - t_prev)
                    t_prev = time.perf_counter()
        else:
            times = []

            def evaluate(genomes, times=times):
                t0 = time.perf_counter()
                out = [score(g) for g in genomes]
                times.append(time.perf_counter() - t0)
                return out
            evo.run(evaluate)
        n = evo.history[measured_gen].evaluated
        direct[mode] = {"evo": evo, "s": times[measured_gen], "n": n, "per": times[measured_gen] / max(1, n)}

    walls: dict[tuple[str, int], float] = {}
    starts: dict[tuple[str, int], float] = {}
    inside: dict[str, float] = {}
    with LocalCluster(num_nodes=3, cpus_per_node=1) as lc:
        ray.init(address=lc.address, log_to_driver=False)
        try:
            for mode in modes:
                for workers in (1, 2):
                    evo = fresh(mode)
                    marks: list[float] = []
                    t0 = time.perf_counter()
                    best, fit, searcher = run_search(tune.with_parameters(trial, setup=setup), evo,
                                                     storage_path=tmp / "tune", name=f"{mode}-w{workers}",
                                                     resources={"cpu": 1}, max_concurrent=workers,
                                                     on_generation=lambda r, marks=marks: marks.append(time.perf_counter()))
                    starts[mode, workers] = marks[0] - t0
                    lo, hi = marks[measured_gen - 1], marks[measured_gen]
                    walls[mode, workers] = hi - lo
                    if workers == 1:  # the trials' own merge + evaluation seconds in that window
                        inside[mode] = sum(s for t, _, s in searcher.timings if lo < t <= hi)
                    ref_evo = direct[mode]["evo"]
                    assert not searcher.failed
                    assert [r.best_key for r in evo.history] == [r.best_key for r in ref_evo.history], \
                        "the search on Tune is the search in this process"
        finally:
            ray.shutdown()

    rows = []
    for mode in modes:
        d = direct[mode]
        rows.append({"mode": mode, "trials": d["n"], "direct_s": round(d["s"], 2), "eval_per_candidate_s": round(d["per"], 3),
                     "tune_1_worker_s": round(walls[mode, 1], 2), "tune_2_workers_s": round(walls[mode, 2], 2),
                     "startup_1_worker_s": round(starts[mode, 1], 2), "startup_2_workers_s": round(starts[mode, 2], 2),
                     "speedup_2_vs_1": round(walls[mode, 1] / walls[mode, 2], 2),
                     "trial_eval_s_1_worker": round(inside[mode], 2),
                     "tune_overhead_per_trial_s": round((walls[mode, 1] - inside[mode]) / max(1, d["n"]), 3)})
    params = sum(t.numel() for t in load_file(str(Path(parents[0]) / "model.safetensors")).values())
    print(f"generation {measured_gen} of a search with population {cfg.population} over {params:,}-parameter "
          f"parents; local cluster of 2 worker nodes x 1 CPU (head 0), {os.cpu_count()} cores")
    print(f"{'mode':<14}{'trials':>7}{'direct s':>10}{'1 worker s':>12}{'2 workers s':>13}{'speedup':>9}"
          f"{'overhead/trial s':>18}{'start 1w/2w s':>15}")
    for r in rows:
        print(f"{r['mode']:<14}{r['trials']:>7}{r['direct_s']:>10.2f}{r['tune_1_worker_s']:>12.2f}"
              f"{r['tune_2_workers_s']:>13.2f}{r['speedup_2_vs_1']:>8.2f}x{r['tune_overhead_per_trial_s']:>18.3f}"
              f"{r['startup_1_worker_s']:>8.1f}/{r['startup_2_workers_s']:.1f}")
    print("target: speedup >= 1.8x. overhead/trial = (1-worker wall - the trials' own merge+eval seconds) / trials.")
    if args.json:
        print(json.dumps({"benchmark": "evomerge_scaling", "date": time.strftime("%Y-%m-%d"),
                          "machine": platform.machine(), "cores": os.cpu_count(), "params": params,
                          "population": cfg.population, "generation": measured_gen, "rows": rows,
                          "target_speedup": 1.8}))


if __name__ == "__main__":
    main()
