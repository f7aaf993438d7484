"""Benchmark: one EvoMerge generation on a local 2-node Ray cluster with 1 and with 2 workers.

Side by side in one run, on the same parents and the same genomes:

- direct: each genome merged and evaluated in this process, one after another, parents loaded
  beforehand (no Ray, no Tune): the work itself, ``e`` seconds per candidate;
- Tune, 1 worker: the generation as Tune trials (``run_search``, ``max_concurrent=1``) on a
  ``cluster.LocalCluster`` of two worker nodes with 1 CPU each (the head has none);
- Tune, 2 workers: the same with ``max_concurrent=2``, one trial per node at a time.

Printed: wall seconds of each, the speedup 2 workers / 1 worker (target >= 1.8x on 2 cores),
and Tune's overhead per trial, ``(T_1worker - N x e) / N``: scheduling, trial start and
result handling, plus each worker's one-time start (process, imports, parents loaded once)
spread over the trials. The parents' own genomes are scored beforehand (as the phase does),
so every trial is a new merge.

Usage: python benchmarks/evomerge_scaling.py [--json] [--trials 12] [--d-model 96] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--trials", type=int, default=12, help="new candidates in the generation")
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=4)
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

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-scaling-"))
    parents = make_parents(tmp / "parents", args.d_model, args.layers)
    setup = {"parents": parents, "data": DataConfig(seq_len=64).model_dump(mode="json"), "seed": 0,
             "eval": {"batch_size": 8, "max_batches": 4, "tasks": 32}, "threads": 1}
    measured = measure_parents(setup)
    ref = reference([Objectives(**o) for o in measured["objectives"]])
    setup["reference"] = ref.to_json()
    cfg = EvolutionConfig(population=3 + args.trials, groups=2, max_generations=1)

    def fresh() -> Evolution:
        evo = Evolution(cfg, n_models=3, seed=1)
        evo.initial()
        for i, obj in enumerate(measured["objectives"]):  # as the phase does: parents are not trials
            evo.cache[parent_genome(i, 3, cfg.groups).key()] = composite(Objectives(**obj), ref)[0]
        return evo

    genomes = fresh().pending()
    assert len(genomes) == args.trials
    evaluate_genome(genomes[0].to_json(), setup)  # warm: parents loaded, kernels touched
    t0 = time.perf_counter()
    direct = {g.key(): evaluate_genome(g.to_json(), setup)["fitness"] for g in genomes}
    t_direct = time.perf_counter() - t0
    per_trial = t_direct / len(genomes)

    walls: dict[int, float] = {}
    with LocalCluster(num_nodes=3, cpus_per_node=1) as lc:
        ray.init(address=lc.address, log_to_driver=False)
        try:
            for workers in (1, 2):
                evo = fresh()
                t0 = time.perf_counter()
                best, fit, searcher = run_search(tune.with_parameters(trial, setup=setup), evo,
                                                 storage_path=tmp / "tune", name=f"w{workers}",
                                                 resources={"cpu": 1}, max_concurrent=workers)
                walls[workers] = time.perf_counter() - t0
                assert not searcher.failed
                assert all(evo.cache[k] == v for k, v in direct.items()), "trials score as the direct evaluation"
        finally:
            ray.shutdown()

    speedup = walls[1] / walls[2]
    overhead = (walls[1] - args.trials * per_trial) / args.trials
    out = {
        "benchmark": "evomerge_scaling", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cores": os.cpu_count(), "trials": args.trials, "d_model": args.d_model, "layers": args.layers,
        "params": sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(Path(parents[0]) / "model.safetensors")).values()),
        "direct_s": round(t_direct, 2), "eval_per_candidate_s": round(per_trial, 3),
        "tune_1_worker_s": round(walls[1], 2), "tune_2_workers_s": round(walls[2], 2),
        "speedup_2_vs_1": round(speedup, 2), "tune_overhead_per_trial_s": round(overhead, 3),
        "target_speedup": 1.8,
    }
    print(f"one generation of {args.trials} new candidates ({out['params']:,}-parameter parents), "
          f"local cluster of 2 worker nodes x 1 CPU, {out['cores']} cores")
    print(f"{'setting':<28}{'wall s':>9}")
    print(f"{'direct, in-process':<28}{t_direct:>9.2f}   ({per_trial:.3f} s per candidate)")
    print(f"{'Tune, 1 worker':<28}{walls[1]:>9.2f}")
    print(f"{'Tune, 2 workers':<28}{walls[2]:>9.2f}")
    print(f"speedup 2 workers / 1 worker: {speedup:.2f}x (target >= 1.8x)")
    print(f"Tune overhead per trial (1 worker, incl. the worker's start spread over the trials): {overhead:.3f} s")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
