"""The pipeline runner: selection, PhaseResult files, resume skipping, re-running corrupted phases.

These use two small test phases (pure Python, deterministic) registered for the test only, so
that the runner's bookkeeping is checked apart from any model training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator import pipeline
from coordinator.config import PipelineConfig, WandbConfig
from coordinator.errors import ConfigError, PhaseNotBuiltError
from coordinator.pipeline import PHASES, PhaseOutput, PipelineFailed, parse_selection, run_pipeline
from coordinator.runfolder import RunFolder
from coordinator.tracking import Tracker

CALLS: list[str] = []
FAIL: set[str] = set()


def _write_model(d: Path, payload: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "test"}))
    (d / "weights.bin").write_bytes(payload)
    return d


def _make(inputs, ctx):
    CALLS.append("t_make")
    if "t_make" in FAIL:
        raise RuntimeError("boom in t_make")
    m = _write_model(ctx.phase_dir / "models" / "m", f"seed={ctx.seed}".encode())
    ctx.log({"training/loss": 1.0}, 0)
    ctx.log({"training/loss": 0.5}, 1)
    return PhaseOutput(models=[m], metrics={"model/total_params": 3})


def _double(inputs, ctx):
    CALLS.append("t_double")
    if "t_double" in FAIL:
        raise RuntimeError("boom in t_double")
    data = (inputs.models[0] / "weights.bin").read_bytes()
    m = _write_model(ctx.phase_dir / "models" / "m", data * 2)
    return PhaseOutput(models=[m], metrics={"size": len(data) * 2})


@pytest.fixture
def test_phases():
    pipeline.ordered_phases()  # load the real registry first
    pipeline.register_phase("t_make", number=91, title="test make", consumes="none")(_make)
    pipeline.register_phase("t_double", number=92, title="test double", consumes="model")(_double)
    CALLS.clear()
    FAIL.clear()
    yield
    PHASES.pop("t_make")
    PHASES.pop("t_double")


def _run(tmp_path: Path, *, resume: bool = False, seed: int = 7, failure: str = "abort"):
    cfg = PipelineConfig(seed=seed, on_phase_failure=failure, wandb=WandbConfig(mode="disabled"))
    run = RunFolder(tmp_path / "run")
    plan = parse_selection(["t_make", "t_double"])
    if not run.exists():
        run.create(run_id="r", config=cfg.model_dump(mode="json"), seed=seed, plan=[s.name for s in plan])
    results = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"), resume=resume)
    return run, results


def test_selection_by_range_name_and_number():
    names = [s.name for s in parse_selection("1-2")]
    assert names == ["cognate", "evomerge"]
    assert [s.name for s in parse_selection(["compress", 1])] == ["cognate", "compress"]
    assert len(parse_selection("all")) == 8


@pytest.mark.parametrize("bad", ["9", "nope", "3-1", ""])
def test_selection_errors_list_the_phases(bad):
    with pytest.raises(ConfigError, match="1=cognate"):
        parse_selection(bad)


def test_unbuilt_phase_is_an_error_naming_it(tmp_path, unbuilt_phase):
    plan = parse_selection(unbuilt_phase)
    cfg = PipelineConfig(wandb=WandbConfig(mode="disabled"))
    run = RunFolder(tmp_path)
    run.create(run_id="r", config={}, seed=0, plan=[unbuilt_phase])
    with pytest.raises(PhaseNotBuiltError, match="'t_unbuilt'.*issue #999"):
        run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"))
    assert not list(tmp_path.glob("97_*")), "an unbuilt phase must leave no output"


def test_results_name_hashed_artifacts_and_lineage(tmp_path, test_phases):
    run, results = _run(tmp_path)
    assert [r.success for r in results] == [True, True]
    first = json.loads((run.root / "91_t_make" / "result.json").read_text())
    second = json.loads((run.root / "92_t_double" / "result.json").read_text())
    assert first["model"]["path"] == "91_t_make/models/m"
    assert second["inputs"] == [first["model"]], "lineage: the input of phase 2 is the output of phase 1"
    assert set(first) >= {"success", "phase", "model", "metrics", "artifacts", "config", "duration_s",
                          "started", "ended", "error"}
    history = (run.root / "91_t_make" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["training/loss"] for x in history] == [1.0, 0.5]


def test_resume_skips_verified_phases(tmp_path, test_phases):
    run, first = _run(tmp_path)
    CALLS.clear()
    _, again = _run(tmp_path, resume=True)
    assert CALLS == [], "finished phases must be skipped, not recomputed"
    assert [r.model.sha256 for r in again] == [r.model.sha256 for r in first]
    events = [e["state"] for e in run.read_state()["events"]]
    assert events[-2:] == ["skipped", "skipped"]


def test_flipped_bit_is_detected_and_that_phase_reruns(tmp_path, test_phases):
    run, first = _run(tmp_path)
    weights = run.root / "92_t_double" / "models" / "m" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0x01
    weights.write_bytes(bytes(data))
    CALLS.clear()
    _, again = _run(tmp_path, resume=True)
    assert CALLS == ["t_double"], "only the corrupted phase runs again"
    assert again[1].model.sha256 == first[1].model.sha256
    reruns = [e for e in run.read_state()["events"] if e["state"] == "rerun"]
    assert "sha256" in reruns[-1]["reason"]


def test_upstream_rerun_forces_downstream_rerun(tmp_path, test_phases):
    run, _ = _run(tmp_path)
    (run.root / "91_t_make" / "result.json").unlink()
    CALLS.clear()
    _run(tmp_path, resume=True)
    assert CALLS == ["t_make", "t_double"]


def test_failure_aborts_and_leaves_a_resumable_run(tmp_path, test_phases):
    FAIL.add("t_double")
    with pytest.raises(PipelineFailed, match="boom in t_double"):
        _run(tmp_path)
    run = RunFolder(tmp_path / "run")
    failed = json.loads((run.root / "92_t_double" / "result.json").read_text())
    assert failed["success"] is False and "boom" in failed["error"]
    FAIL.clear()
    CALLS.clear()
    _, results = _run(tmp_path, resume=True)
    assert CALLS == ["t_double"] and all(r.success for r in results)


def test_failure_continue_passes_inputs_through(tmp_path, test_phases):
    FAIL.add("t_make")
    cfg_failure = "continue"
    pipeline.register_phase("t_after", number=93, title="after", consumes="none")(
        lambda inputs, ctx: PhaseOutput(metrics={"ran": 1}))
    try:
        cfg = PipelineConfig(on_phase_failure=cfg_failure, wandb=WandbConfig(mode="disabled"))
        run = RunFolder(tmp_path / "run")
        plan = parse_selection(["t_make", "t_after"])
        run.create(run_id="r", config={}, seed=0, plan=[s.name for s in plan])
        results = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"))
    finally:
        PHASES.pop("t_after")
    assert [r.success for r in results] == [False, True]


def test_a_single_phase_takes_model_dirs_or_another_run(tmp_path, test_phases):
    source, first = _run(tmp_path / "a")
    model_dir = source.resolve(first[0].model)
    cfg = PipelineConfig(wandb=WandbConfig(mode="disabled"))
    plan = parse_selection(["t_double"])
    for name, kwargs in {"model": dict(input_models=[model_dir]), "from": dict(from_run=source)}.items():
        run = RunFolder(tmp_path / name)
        run.create(run_id=name, config={}, seed=0, plan=["t_double"])
        (result,) = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, name), **kwargs)
        assert result.success and result.inputs[0].sha256 == first[0].model.sha256
        assert result.model.sha256 == first[1].model.sha256


def test_a_phase_without_inputs_says_where_to_get_them(tmp_path, test_phases):
    cfg = PipelineConfig(wandb=WandbConfig(mode="disabled"))
    run = RunFolder(tmp_path / "run")
    run.create(run_id="r", config={}, seed=0, plan=["t_double"])
    with pytest.raises(Exception, match="--model DIR"):
        run_pipeline(cfg, run, parse_selection(["t_double"]), tracker=Tracker(cfg.wandb, run, "r"))


def test_non_finite_metrics_are_recorded_as_strings(tmp_path, test_phases):
    pipeline.register_phase("t_nan", number=94, title="nan", consumes="none")(
        lambda inputs, ctx: PhaseOutput(metrics={"loss": float("nan"), "ratio": float("inf"), "ok": 1.5}))
    try:
        cfg = PipelineConfig(wandb=WandbConfig(mode="disabled"))
        run = RunFolder(tmp_path / "run")
        run.create(run_id="r", config={}, seed=0, plan=["t_nan"])
        (result,) = run_pipeline(cfg, run, parse_selection(["t_nan"]), tracker=Tracker(cfg.wandb, run, "r"))
    finally:
        PHASES.pop("t_nan")
    saved = json.loads((run.root / "94_t_nan" / "result.json").read_text())
    assert saved["metrics"] == {"loss": "nan", "ratio": "inf", "ok": 1.5}


def test_errors_survive_pickling_as_ray_does_across_processes():
    import pickle

    from coordinator.errors import ArtifactError, ConfigError, PhaseError

    for err in (ArtifactError("/m/model.safetensors", "sha256 differs"), PhaseError("cognate", "diverged"),
                PhaseNotBuiltError("bitnet", 7), ConfigError("bad", [("seed", "must be >= 0")])):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert back.__dict__ == err.__dict__ or getattr(back, "problems", None) == getattr(err, "problems", None)
