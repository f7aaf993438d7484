"""Benchmark: the agent runtime's overhead, throughput and recovery time, measured side by side.

Three measurements, in one run, on one embedded local Ray (``--cpus``, default 2):

1. Latency of a no-op task, sequential calls after a warm-up, median and p99:
   - raw:         ``ray.get(actor.noop.remote())`` on a plain Ray actor (the floor)
   - agent:       ``ray.get(agent.handle.remote(request))`` on our Agent actor (codec both ways,
                  no coordinator)
   - coordinator: a chain of tasks through ``Team.run`` (each task consumes the previous one,
                  so they run one at a time): one task's latency is the time between two
                  consecutive completions, i.e. everything the coordinator does per task
                  (scheduler, breaker, request encode, dispatch, ray.wait, reply decode,
                  health accounting). Target: coordinator / raw median <= 1.3, taken as the
                  median over rounds of each round's ratio of medians (rows interleave).
2. Throughput: ``--tasks`` independent tasks on 4 agents (``digest-1`` to ``digest-4``, 0.5 CPU
   each: sha256 of a tiny message, so the runtime's cost dominates), tasks / wall second of
   ``Team.run``. Target: >= 500 tasks/s with 4 agents on 2 cores.
3. Kill to successful retry: one agent runs a 1 s task; 0.3 s in, the agent is killed
   (``ray.kill``, Ray restarts it); time from the kill to the task's completion on the restarted
   agent, minus the task's own 1 s of work that has to run again. ``--kills`` repeats, median.
   Target: median < 2 s.

Usage: python benchmarks/coordinator.py [--json] [--quick] [--cpus 2] [--tasks 2000] [--kills 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from actors.base import AgentSpec, TeamSpec, make_request, spawn, wait_ready  # noqa: E402
from coordinator.dag import TaskSpec  # noqa: E402
from coordinator.recovery import RecoveryPolicy, Strategy  # noqa: E402
from coordinator.team import Team, TeamConfig  # noqa: E402


@ray.remote(num_cpus=0.5)
class Plain:
    """A plain Ray actor: the raw-call baseline."""

    def noop(self) -> None:
        return None


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values) * 1e3, "p99_ms": pct(values, 0.99) * 1e3, "n": len(values)}


def bench_latency(n: int, work: Path, rounds: int = 10) -> dict[str, dict[str, float]]:
    """The three rows, interleaved in ``rounds`` rounds so that machine noise hits them alike.

    Besides the pooled percentiles, ``ratio_by_round`` is the coordinator/raw ratio of medians
    within each round: the side-by-side figure least moved by a noisy neighbour on the machine."""
    plain = Plain.remote()
    ray.get(plain.noop.remote())
    agent = spawn(AgentSpec(role="noop", num_cpus=0.5), run_id="bench", team="lat", checkpoint_root=work / "lat")
    wait_ready({"noop": agent})
    req = make_request("t")
    per_round = max(10, n // rounds)
    tasks = tuple(TaskSpec(name=f"c{i}", role="noop", inputs=(f"c{i - 1}",) if i else ()) for i in range(per_round + 1))
    spec = TeamSpec(name="chain", agents=(AgentSpec(role="noop", num_cpus=0.5),), tasks=tasks)
    samples: dict[str, list[float]] = {"raw": [], "agent": [], "coordinator": []}
    ratios: list[float] = []

    def timed(call, out: list[float]) -> None:
        for _ in range(per_round):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)

    with Team(spec, run_id="bench", work_dir=work / "chain", config=TeamConfig(heartbeat_interval_s=1.0)) as team:
        for r in range(rounds + 1):  # round 0 warms every path up and is not counted
            raw, direct = [], []
            timed(lambda: ray.get(plain.noop.remote()), raw)
            timed(lambda: ray.get(agent.handle.remote(req)), direct)
            result = team.run()
            done = [result.timings[t.name][1] for t in tasks]
            if r:
                through = [b - a for a, b in zip(done, done[1:])]
                samples["raw"] += raw
                samples["agent"] += direct
                samples["coordinator"] += through
                ratios.append(statistics.median(through) / statistics.median(raw))
    ray.kill(plain)
    ray.kill(agent)
    out: dict = {name: summary(values) for name, values in samples.items()}
    out["ratio_by_round"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def bench_throughput(n: int, work: Path) -> dict[str, float]:
    roles = ("digest-1", "digest-2", "digest-3", "digest-4")
    agents = tuple(AgentSpec(role=r, num_cpus=0.5) for r in roles)

    def team_of(count: int, name: str) -> TeamSpec:
        return TeamSpec(name=name, agents=agents,
                        tasks=tuple(TaskSpec(name=f"t{i}", role=roles[i % 4], payload=i) for i in range(count)))

    with Team(team_of(200, "warm"), run_id="bench", work_dir=work / "warm") as team:
        team.run()
    with Team(team_of(n, "wide"), run_id="bench", work_dir=work / "wide") as team:
        t0 = time.perf_counter()
        result = team.run()
        wall = time.perf_counter() - t0
    assert result.succeeded, result.causes
    return {"tasks": n, "agents": 4, "wall_s": wall, "tasks_per_s": n / wall}


def bench_kill(kills: int, work: Path) -> dict[str, float]:
    policy = RecoveryPolicy(strategies=(Strategy.retry, Strategy.restart), retry_attempts=3)
    work_s, kill_at = 1.0, 0.3
    spans: list[float] = []
    for k in range(kills):
        spec = TeamSpec(name=f"kill{k}", agents=(AgentSpec(role="echo", num_cpus=0.5),),
                        tasks=(TaskSpec(name="slow", role="echo", payload={"sleep_s": work_s}, policy=policy),))
        with Team(spec, run_id="bench", work_dir=work / f"kill{k}", config=TeamConfig(heartbeat_interval_s=1.0)) as team:
            killed_at: list[float] = []

            def kill() -> None:
                killed_at.append(time.monotonic())
                ray.kill(team.agents["echo"], no_restart=False)

            timer = threading.Timer(kill_at, kill)
            timer.start()
            result = team.run()
            timer.join()
        assert result.succeeded and result.dispatches["slow"] >= 2, (result.dispatches, result.decisions)
        done_at = result.started_at + result.timings["slow"][1]
        spans.append(done_at - killed_at[0] - work_s)
    return {"kills": kills, "median_s": statistics.median(spans), "max_s": max(spans),
            "spans_s": [round(s, 3) for s in spans]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--calls", type=int, default=500, help="sequential calls per latency row")
    p.add_argument("--tasks", type=int, default=2000, help="tasks in the throughput graph")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    args = p.parse_args()
    if args.quick:
        args.calls, args.tasks, args.kills, args.rounds = 100, 300, 2, 4
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, namespace="agentforge-bench")
    try:
        with tempfile.TemporaryDirectory(prefix="afbench") as tmp:
            work = Path(tmp)
            lat = bench_latency(args.calls, work, args.rounds)
            thr = bench_throughput(args.tasks, work)
            kill = bench_kill(args.kills, work)
    finally:
        ray.shutdown()
    ratio = lat["ratio_by_round"]["median"]
    out = {"machine": {"cpus_for_ray": args.cpus, "cores": os.cpu_count(), "python": platform.python_version(),
                       "ray": ray.__version__},
           "latency": lat, "coordinator_over_raw_median": ratio,
           "coordinator_over_raw_pooled_median": lat["coordinator"]["median_ms"] / lat["raw"]["median_ms"],
           "coordinator_over_raw_p99": lat["coordinator"]["p99_ms"] / lat["raw"]["p99_ms"],
           "throughput": thr, "kill_to_retry": kill,
           "targets": {"latency_ratio<=1.3": ratio <= 1.3, "tasks_per_s>=500": thr["tasks_per_s"] >= 500,
                       "kill_median<2s": kill["median_s"] < 2.0}}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"Ray {ray.__version__}, {args.cpus} CPUs for Ray on a {os.cpu_count()}-core machine")
    print(f"{'no-op latency':<22}{'median ms':>10}{'p99 ms':>10}{'calls':>7}")
    for name in ("raw", "agent", "coordinator"):
        row = lat[name]  # pooled over the rounds
        print(f"  {name:<20}{row['median_ms']:>10.3f}{row['p99_ms']:>10.3f}{row['n']:>7}")
    rr = lat["ratio_by_round"]
    print(f"  coordinator / raw, median: {ratio:.2f}x (median of {args.rounds} per-round ratios, range "
          f"{rr['min']:.2f}-{rr['max']:.2f}; pooled {out['coordinator_over_raw_pooled_median']:.2f}x); "
          f"p99 {out['coordinator_over_raw_p99']:.2f}x. Target: median <= 1.3x")
    print(f"throughput: {thr['tasks']} tasks on 4 agents in {thr['wall_s']:.2f} s = {thr['tasks_per_s']:.0f} tasks/s "
          "(target >= 500)")
    print(f"kill -> successful retry: median {kill['median_s']:.2f} s, max {kill['max_s']:.2f} s over {kill['kills']} "
          f"kills (target median < 2 s); each: {kill['spans_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
