"""The 8-phase pipeline runner: phase registry, PhaseResult bookkeeping, resume.

A phase is registered by name with its number, what it consumes and what it produces, and a
*driver*: ``driver(inputs, ctx) -> PhaseOutput``. Drivers live in ``coordinator/drivers/`` and
put the pure algorithms of ``phases/`` onto Ray (tasks, Tune trials, agent teams). The runner
owns what every phase shares, the way Tune's Trainable.train() wraps step(): timing, hashing,
result.json, W&B, resume and failure handling (CONVENTIONS.md, rule 5).

Resume: ``run(resume=True)`` walks the plan in order; a phase whose result.json and every
artifact it names verify (sha256) and whose recorded inputs equal what its upstream phase now
provides is skipped; the first phase that does not verify, and every phase after it, runs
again. A phase's own ``work/`` checkpoints survive, so a long phase continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from coordinator.config import PipelineConfig
from coordinator.errors import AgentForgeError, ConfigError, PhaseError, PhaseNotBuiltError
from coordinator.runfolder import ArtifactRef, PhaseResult, RunFolder, now_iso
from serialization.checkpoint import atomic_write_json

__all__ = [
    "PHASES",
    "PhaseSpec",
    "PhaseInputs",
    "PhaseContext",
    "PhaseOutput",
    "PipelineFailed",
    "register_phase",
    "register_unbuilt",
    "check_built",
    "parse_selection",
    "run_pipeline",
]

log = logging.getLogger("agentforge")

Consumes = Literal["none", "model", "models"]


@dataclass(frozen=True)
class PhaseInputs:
    """The models a phase consumes: HF directories and their references (for lineage), and the
    upstream phase's named artifacts (e.g. Cognate's ``base_model``, the variants' common
    ancestor) when the models come from a phase of a run (not from ``--model``)."""

    models: list[Path] = field(default_factory=list)
    refs: list[ArtifactRef] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)


@dataclass
class PhaseOutput:
    """What a driver returns. Paths must already be durably written inside the phase dir."""

    models: list[Path] = field(default_factory=list)
    model: Path | None = None  # primary model; defaults to models[0]
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    degraded: str | None = None
    # Tables to read (name -> rows, each a dict with the same keys): written to the phase's
    # tables.json, logged to W&B as wandb.Table and shown in report.html.
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class PhaseContext:
    """Everything a driver may use. ``log`` and ``progress`` go to W&B and the terminal."""

    run: RunFolder
    phase: str
    number: int
    phase_dir: Path
    work_dir: Path
    seed: int
    config: PipelineConfig
    log: Callable[[dict[str, Any], int | None], None]
    progress: Callable[[str, int, int], None]


Driver = Callable[[PhaseInputs, PhaseContext], PhaseOutput]


@dataclass(frozen=True)
class PhaseSpec:
    number: int
    name: str
    title: str
    consumes: Consumes
    driver: Driver | None  # None: not built yet
    issue: int | None = None  # the issue that builds it, while it is not built

    @property
    def built(self) -> bool:
        return self.driver is not None


PHASES: dict[str, PhaseSpec] = {}


def _add(spec: PhaseSpec) -> None:
    clash = [s.name for s in PHASES.values() if s.number == spec.number and s.name != spec.name]
    if clash:
        raise ValueError(f"phase number {spec.number} is taken by {clash[0]!r}")
    PHASES[spec.name] = spec


def register_phase(name: str, *, number: int, title: str, consumes: Consumes) -> Callable[[Driver], Driver]:
    """Decorator registering ``driver`` as phase ``name``."""

    def deco(driver: Driver) -> Driver:
        _add(PhaseSpec(number=number, name=name, title=title, consumes=consumes, driver=driver))
        return driver

    return deco


def register_unbuilt(name: str, *, number: int, title: str, consumes: Consumes, issue: int) -> None:
    """Declare a phase of the plan whose algorithm is not built yet: running it is an error."""
    if name in PHASES and PHASES[name].built:
        return
    _add(PhaseSpec(number=number, name=name, title=title, consumes=consumes, driver=None, issue=issue))


def _load_drivers() -> None:
    import coordinator.drivers  # noqa: F401 - registers every phase


def ordered_phases() -> list[PhaseSpec]:
    _load_drivers()
    return sorted(PHASES.values(), key=lambda s: s.number)


def parse_selection(items: list[str | int] | str) -> list[PhaseSpec]:
    """Turn ``"1-2"``, ``"evomerge,compress"``, ``["cognate", 2]`` or ``"all"`` into specs.

    Raises:
        ConfigError: an unknown phase name or number, listing the valid ones.
    """
    specs = ordered_phases()
    by_number = {s.number: s for s in specs}
    by_name = {s.name: s for s in specs}
    if isinstance(items, str):
        items = [p for p in re.split(r"[,\s]+", items.strip()) if p]
    chosen: set[int] = set()
    valid = ", ".join(f"{s.number}={s.name}" for s in specs)
    for item in items:
        text = str(item).strip().lower()
        if text == "all":
            chosen.update(by_number)
        elif re.fullmatch(r"\d+-\d+", text):
            lo, hi = (int(x) for x in text.split("-"))
            if lo > hi or lo not in by_number or hi not in by_number:
                raise ConfigError(f"phase range {text!r} is not within 1-{max(by_number)}; phases: {valid}")
            chosen.update(range(lo, hi + 1))
        elif text.isdigit() and int(text) in by_number:
            chosen.add(int(text))
        elif text in by_name:
            chosen.add(by_name[text].number)
        else:
            raise ConfigError(f"unknown phase {item!r}; phases: {valid}")
    if not chosen:
        raise ConfigError(f"no phases selected; phases: {valid}")
    return [by_number[n] for n in sorted(chosen)]


class PipelineFailed(AgentForgeError):
    """A phase failed and the pipeline stopped. ``run_dir`` can be resumed."""

    def __init__(self, phase: str, reason: str, run_dir: Path):
        super().__init__(f"phase {phase!r} failed: {reason}")
        self.phase = phase
        self.reason = reason
        self.run_dir = run_dir


def _inputs_from_result(run: RunFolder, result: PhaseResult) -> PhaseInputs:
    refs = list(result.models) or ([result.model] if result.model else [])
    return PhaseInputs(models=[run.resolve(r) for r in refs], refs=refs,
                       artifacts={name: run.resolve(r) for name, r in result.artifacts.items()})


def _upstream_inputs(
    spec: PhaseSpec,
    run: RunFolder,
    produced: dict[int, PhaseInputs],
    input_models: list[Path] | None,
    from_run: RunFolder | None,
) -> PhaseInputs:
    """Where a phase's input models come from: this run's previous phase, --model, --from."""
    if spec.consumes == "none":
        return PhaseInputs()
    earlier = [n for n in produced if n < spec.number]
    if earlier:
        return produced[max(earlier)]
    if input_models:
        refs = [run.ref(p) for p in input_models]
        return PhaseInputs(models=[Path(p).resolve() for p in input_models], refs=refs)
    for source in (run, from_run):
        if source is None:
            continue
        for prev in reversed([s for s in ordered_phases() if s.number < spec.number]):
            result, reason = source.verify_result(prev.number, prev.name)
            if result is not None and reason is None:
                inputs = _inputs_from_result(source, result)
                return PhaseInputs(models=inputs.models, refs=[source.ref(p) for p in inputs.models],
                                   artifacts=inputs.artifacts)
    raise PhaseError(
        spec.name,
        "needs input models: run an earlier phase in the same run, pass --model DIR, "
        "or --from RUN with a finished earlier phase",
    )


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: record them as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _check_arity(spec: PhaseSpec, inputs: PhaseInputs) -> None:
    if spec.consumes == "model" and len(inputs.models) != 1:
        raise PhaseError(spec.name, f"takes exactly one input model, got {len(inputs.models)}")
    if spec.consumes == "models" and not inputs.models:
        raise PhaseError(spec.name, "takes one or more input models, got none")
    for p in inputs.models:
        if not (p / "config.json").exists():
            raise PhaseError(spec.name, f"input {p} is not an HF model directory (no config.json)")


def _run_one(
    spec: PhaseSpec, inputs: PhaseInputs, cfg: PipelineConfig, run: RunFolder, tracker: Any, progress: Callable
) -> PhaseResult:
    phase_dir = run.phase_dir(spec.number, spec.name)
    work_dir = run.work_dir(spec.number, spec.name)
    phase_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    section = cfg.section(spec.name)
    section_json = section.model_dump(mode="json") if section is not None else {}
    started, t0 = now_iso(), time.perf_counter()
    run.set_phase_state(spec.name, "running", started=started)
    ctx = PhaseContext(
        run=run,
        phase=spec.name,
        number=spec.number,
        phase_dir=phase_dir,
        work_dir=work_dir,
        seed=cfg.seed,
        config=cfg,
        log=tracker.log,
        progress=progress,
    )
    result = PhaseResult(success=False, phase=spec.name, number=spec.number, inputs=inputs.refs,
                         config=section_json, started=started)
    try:
        if spec.driver is None:
            raise PhaseNotBuiltError(spec.name, spec.issue)
        _check_arity(spec, inputs)
        tracker.start_phase(spec.name, spec.number, section_json, inputs.refs)
        out = spec.driver(inputs, ctx)
        models = [run.ref(p) for p in out.models]
        primary = out.model or (out.models[0] if out.models else None)
        result.model = run.ref(primary) if primary is not None else None
        result.models = models
        result.artifacts = {name: run.ref(p) for name, p in out.artifacts.items()}
        result.metrics = {k: _json_safe(v) for k, v in out.metrics.items()}
        result.degraded = out.degraded
        if out.tables:
            atomic_write_json(phase_dir / "tables.json", out.tables)
            tracker.log_tables(out.tables)
        result.success = True
    except Exception as err:  # noqa: BLE001 - every failure becomes a recorded PhaseResult
        result.error = f"{type(err).__name__}: {err}"
        to_dict = getattr(err, "to_dict", None)
        if callable(to_dict):  # e.g. a team's EscalationError: team, task, role, kind, tried
            result.failure = {**to_dict(), "then": cfg.on_phase_failure}
        log.debug("phase %s failed", spec.name, exc_info=True)
    result.ended = now_iso()
    result.duration_s = round(time.perf_counter() - t0, 3)
    run.write_result(result)
    extra = {"error": result.error}
    if not result.success:
        extra["then"] = cfg.on_phase_failure  # what the pipeline does next: abort or continue
        if result.failure:
            extra["failure"] = result.failure
    run.set_phase_state(spec.name, "done" if result.success else "failed", **extra)
    tracker.finish_phase(result, run)
    return result


def check_built(plan: list[PhaseSpec]) -> None:
    """Fail before any work when the plan names a phase that is not built: it could never finish.

    Raises:
        PhaseNotBuiltError: naming the first such phase, its issue, and the phases built so far.
    """
    unbuilt = [s for s in plan if not s.built]
    if unbuilt:
        built = ", ".join(s.name for s in ordered_phases() if s.built)
        raise PhaseNotBuiltError(unbuilt[0].name, unbuilt[0].issue, hint=f"phases built so far: {built}")


def run_pipeline(
    cfg: PipelineConfig,
    run: RunFolder,
    plan: list[PhaseSpec],
    *,
    tracker: Any,
    progress: Callable[[str, int, int], None] = lambda *_: None,
    resume: bool = False,
    input_models: list[Path] | None = None,
    from_run: RunFolder | None = None,
) -> list[PhaseResult]:
    """Run ``plan`` in order; see the module docstring for resume semantics.

    Raises:
        PipelineFailed: a phase failed and ``cfg.on_phase_failure`` is ``abort``.
    """
    check_built(plan)
    results: list[PhaseResult] = []
    produced: dict[int, PhaseInputs] = {}
    rerun_from: str | None = None  # once one phase re-runs, every later phase does too
    for spec in plan:
        inputs = _upstream_inputs(spec, run, produced, input_models, from_run)
        if resume and rerun_from is None:
            result, reason = run.verify_result(spec.number, spec.name)
            if reason is None and result is not None and [r.sha256 for r in result.inputs] != [
                r.sha256 for r in inputs.refs
            ]:
                reason = "its recorded inputs differ from what the upstream phase now provides"
            if reason is None and result is not None:
                n = len(result.all_refs())
                log.info("phase %d %s: skipped, result and %d artifact(s) verified", spec.number, spec.name, n)
                run.set_phase_state(spec.name, "skipped", reason="verified")
                results.append(result)
                produced[spec.number] = _inputs_from_result(run, result)
                continue
            if result is not None or reason != "no result.json":
                log.warning("phase %d %s: runs again: %s", spec.number, spec.name, reason)
                run.set_phase_state(spec.name, "rerun", reason=reason)
            rerun_from = spec.name
        stale = run.result_file(spec.number, spec.name)
        if stale.exists():
            stale.unlink()  # never leave a result that names artifacts about to be rewritten
        log.info("phase %d %s: running", spec.number, spec.name)
        result = _run_one(spec, inputs, cfg, run, tracker, progress)
        results.append(result)
        if result.success:
            log.info("phase %d %s: done in %.1f s", spec.number, spec.name, result.duration_s)
            produced[spec.number] = _inputs_from_result(run, result)
            continue
        if cfg.on_phase_failure == "abort":
            raise PipelineFailed(spec.name, result.error or "unknown error", run.root)
        log.error("phase %d %s failed (%s); on_phase_failure=continue: the next phase takes its inputs",
                  spec.number, spec.name, result.error)
        produced[spec.number] = inputs
    return results
