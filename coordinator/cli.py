"""The ``agentforge`` command: run, resume, status, report, submit, phase, drill.

Exit codes: 0 success; 1 a phase or the job failed (the run folder stays resumable);
2 bad usage or config. On failure one line on stderr says what failed and where the run
folder is. ``--json`` prints machine-readable output on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.errors import AgentForgeError, ConfigError

__all__ = ["main", "build_parser"]

log = logging.getLogger("agentforge")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentforge", description="Create small language models on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_run_options(sp: argparse.ArgumentParser, phases: bool = True) -> None:
        sp.add_argument("config", nargs="?", help="pipeline YAML (default: --preset tiny)")
        sp.add_argument("--preset", help="a preset from configs/ (tiny, small, base)")
        if phases:
            sp.add_argument("--phases", help="subset to run: '1-2', 'cognate,evomerge', 'all'")
        sp.add_argument("--out", type=Path, help="run folder (default: runs/<name>-<timestamp>)")
        sp.add_argument("--address", help="Ray address (default: RAY_ADDRESS or an embedded local Ray)")
        sp.add_argument("--seed", type=int, help="override the config's seed")
        sp.add_argument("--wandb", choices=["online", "offline", "disabled"], help="W&B mode (default offline)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set cognate.steps=50 (repeatable)")
        sp.add_argument("--model", dest="models", action="append", type=Path, default=[], metavar="DIR",
                        help="input HF model dir for the first selected phase (repeatable)")
        sp.add_argument("--from", dest="from_run", type=Path, metavar="RUN",
                        help="take input models from a finished phase of another run folder")
        sp.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
        add_chaos_option(sp)

    def add_chaos_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--chaos", nargs="?", const="default", metavar="SPEC",
                        help="inject faults into agent teams: 'default' (the profile in coordinator/chaos.py) "
                             "or key=value pairs of the chaos section, e.g. kill_rate=0.2,node_kill_rate=0.5,seed=3")

    sp = sub.add_parser("run", help="run the pipeline")
    add_run_options(sp)

    sp = sub.add_parser("phase", help="run one phase on given model directories")
    sp.add_argument("name", help="phase name or number")
    add_run_options(sp, phases=False)
    sp.add_argument("--models", dest="models_list", nargs="+", type=Path, default=[], metavar="DIR")

    sp = sub.add_parser("resume", help="continue a run from its first phase that does not verify")
    sp.add_argument("run_dir", type=Path)
    sp.add_argument("--until", metavar="PHASE",
                    help="stop after this phase (name or number); a later `agentforge resume RUN` runs the rest")
    sp.add_argument("--address")
    sp.add_argument("--wandb", choices=["online", "offline", "disabled"])
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("status", help="show a run's phases")
    sp.add_argument("run_dir", type=Path)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("report", help="write RUN/report.html")
    sp.add_argument("run_dir", type=Path)
    sp.add_argument("--out", type=Path)

    sp = sub.add_parser("submit", help="submit `agentforge <args>` to a Ray cluster as a Ray job")
    from cluster.jobs import add_submit_arguments

    add_submit_arguments(sp)

    sp = sub.add_parser("drill", help="run a 20-task agent team with and without faults and compare the outputs")
    sp.add_argument("--address", help="Ray address (default: RAY_ADDRESS or an embedded local Ray)")
    add_chaos_option(sp)
    sp.add_argument("--out", type=Path, help="report folder (default: runs/drill-<timestamp>)")
    sp.add_argument("--layers", type=int, default=4, help="graph layers (default 4)")
    sp.add_argument("--width", type=int, default=5, help="tasks per layer (default 5)")
    sp.add_argument("--work-s", type=float, default=0.02, help="seconds each task works (default 0.02)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    return p


# -- helpers ------------------------------------------------------------------------------------
def _setup_logging() -> None:
    level = os.environ.get("AGENTFORGE_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s agentforge %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("agentforge").setLevel(level)


class _Progress:
    """Progress bars on stderr (rich), one per named piece of work."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self._bars = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, disable=not console.is_terminal)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "_Progress":
        self._bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bars.stop()

    def __call__(self, name: str, done: int, total: int) -> None:
        if name not in self._tasks:
            self._tasks[name] = self._bars.add_task(name, total=total)
        self._bars.update(self._tasks[name], completed=done, total=total)


def _config(args: argparse.Namespace, phases: list[str] | None) -> Any:
    from coordinator.config import apply_overrides, load_config, parse_config

    _, raw = load_config(args.config, preset=args.preset)
    extra = list(args.overrides)
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    if args.wandb:
        extra.append(f"wandb.mode={args.wandb}")
    if args.address:
        extra.append(f"ray.address={args.address}")
    if args.chaos is not None:
        from coordinator.chaos import parse_chaos_flag

        extra += parse_chaos_flag(args.chaos)
    if extra:
        raw = apply_overrides(raw, extra)
    if phases is not None:
        raw = {**raw, "phases": phases}
    return parse_config(raw, source=args.config or f"preset {args.preset or 'tiny'}")


def _until(plan: list, until: str | None) -> list:
    """The plan up to and including the phase ``until`` names (its name or number).

    Raises:
        ConfigError: key ``until``: the run's plan has no such phase (the plan's phases listed).
    """
    if until is None:
        return plan
    for i, spec in enumerate(plan):
        if until.strip() in (spec.name, str(spec.number)):
            return plan[: i + 1]
    msg = (f"--until {until!r}: not a phase of this run; its phases are "
           f"{', '.join(f'{s.number} {s.name}' for s in plan)}")
    raise ConfigError(msg, [("until", msg)])


def _execute(run_dir: Path, *, resume: bool, address: str | None, wandb_mode: str | None, as_json: bool,
             until: str | None = None) -> int:
    """Run (or resume) the pipeline recorded in ``run_dir/pipeline.json``, through ``until``."""
    from cluster.connect import connect
    from coordinator.config import parse_config
    from coordinator.pipeline import PipelineFailed, parse_selection, run_pipeline
    from coordinator.report import build_report
    from coordinator.runfolder import RunFolder
    from coordinator.tracking import Tracker

    run = RunFolder(run_dir)
    state = run.read_state()
    raw = dict(state["config"])
    if wandb_mode:
        raw["wandb"] = {**raw.get("wandb", {}), "mode": wandb_mode}
    cfg = parse_config(raw, source=str(run.pipeline_file))
    plan = _until(parse_selection(state["plan"]), until)
    info = connect(address or cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    log.info("Ray: %s (dashboard %s); run folder %s", info.address, info.dashboard_url, run.root)
    tracker = Tracker(cfg.wandb, run, group=state["run_id"])
    models = [Path(p) for p in state.get("input_models", [])]
    from_run = RunFolder(state["from_run"]) if state.get("from_run") else None
    failed: PipelineFailed | None = None
    try:
        with _Progress() as progress:
            results = run_pipeline(cfg, run, plan, tracker=tracker, progress=progress, resume=resume,
                                   input_models=models or None, from_run=from_run)
    except PipelineFailed as err:
        failed, results = err, []
    finally:
        tracker.close()
    report = build_report(run)
    if as_json:
        from coordinator.report import collect_status

        print(json.dumps(collect_status(run), indent=2))
    if failed is not None:
        print(f"agentforge: {failed}; run folder: {run.root} (resume with `agentforge resume {run.root}`)",
              file=sys.stderr)
        return 1
    for r in results:
        model = f" model {r.model.path} sha256 {r.model.sha256[:16]}" if r.model else ""
        log.info("%02d %s: %s in %.1f s%s", r.number, r.phase, "ok" if r.success else "FAILED", r.duration_s, model)
    log.info("report: %s", report)
    return 0


def _cmd_run(args: argparse.Namespace, phases: list[str] | None = None) -> int:
    from coordinator.pipeline import check_built, parse_selection
    from coordinator.runfolder import RunFolder

    cfg = _config(args, phases)
    plan = parse_selection(cfg.phases)
    check_built(plan)
    run_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and (args.out is None or not args.out.is_absolute()):
        # Inside a Ray job the cwd is the unpacked working_dir on one node, deleted after the job.
        log.warning("running as a Ray job with a relative run folder: it lives in the job's temporary "
                    "working dir on one node; pass --out on storage every node reaches")
    run = RunFolder(args.out or Path("runs") / run_id)
    if run.exists():
        raise ConfigError(f"{run.root} already holds a run; use `agentforge resume {run.root}` or another --out")
    models = list(args.models) + list(getattr(args, "models_list", []))
    run.create(run_id=run_id, config=cfg.model_dump(mode="json"), seed=cfg.seed, plan=[s.name for s in plan])
    state = run.read_state()
    state["input_models"] = [str(p.resolve()) for p in models]
    state["from_run"] = str(args.from_run.resolve()) if args.from_run else None
    from serialization.checkpoint import atomic_write_json

    atomic_write_json(run.pipeline_file, state)
    log.info("run %s: phases %s, seed %d", run_id, ", ".join(s.name for s in plan), cfg.seed)
    return _execute(run.root, resume=False, address=args.address, wandb_mode=None, as_json=args.json)


def _cmd_drill(args: argparse.Namespace) -> int:
    from coordinator.chaos import ChaosConfig, parse_chaos_flag
    from coordinator.config import apply_overrides

    if args.layers < 2 or args.width < 2:
        raise ConfigError("--layers and --width must be at least 2")
    raw = apply_overrides({}, parse_chaos_flag(args.chaos if args.chaos is not None else "default"))
    chaos = ChaosConfig.from_dict(raw["chaos"], prefix="chaos")
    from cluster.connect import connect
    from coordinator.drill import run_drill

    out = args.out or Path("runs") / f"drill-{time.strftime('%Y%m%d-%H%M%S')}"
    info = connect(args.address)
    log.info("Ray: %s (dashboard %s); drill report in %s", info.address, info.dashboard_url, out)
    report = run_drill(chaos, out, run_id=out.name.replace("/", "-"), layers=args.layers, width=args.width,
                       work_s=args.work_s)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.summary())
    return 0 if report.passed else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from coordinator.report import collect_status
    from coordinator.runfolder import RunFolder

    status = collect_status(RunFolder(args.run_dir))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"run {status['run_id']}  seed {status['seed']}  {status['run_dir']}")
    for p in status["phases"]:
        took = f"{p['duration_s']:.1f}s" if p["duration_s"] is not None else ""
        extra = p["error"] or p["degraded"] or ""
        print(f"  {p['number'] or 0:02d} {p['phase']:<10} {p['state']:<8} {took:>8}  {extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agentforge`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "run":
            return _cmd_run(args, phases=[args.phases] if args.phases else None)
        if args.command == "phase":
            return _cmd_run(args, phases=[args.name])
        if args.command == "resume":
            return _execute(args.run_dir, resume=True, address=args.address, wandb_mode=args.wandb, as_json=args.json,
                            until=args.until)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "report":
            from coordinator.report import build_report
            from coordinator.runfolder import RunFolder

            print(build_report(RunFolder(args.run_dir), args.out))
            return 0
        if args.command == "drill":
            return _cmd_drill(args)
        if args.command == "submit":
            from cluster.jobs import run_submit

            return run_submit(args)
    except ConfigError as err:
        print(f"agentforge: config error: {err}", file=sys.stderr)
        return 2
    except AgentForgeError as err:
        print(f"agentforge: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentforge: interrupted; the run folder can be resumed with `agentforge resume RUN`", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
