"""(e), pipeline half: a phase whose agent team escalates fails with a structured error, and the
pipeline aborts or continues as ``on_phase_failure`` says, recording which in the run folder."""

from __future__ import annotations

import pytest

import tests.chaos.team_roles  # noqa: F401 - registers the test roles
from actors.base import AgentSpec, TeamSpec
from coordinator import pipeline
from coordinator.config import PipelineConfig, WandbConfig
from coordinator.dag import TaskSpec
from coordinator.drivers.teams import run_team
from coordinator.pipeline import PHASES, PhaseOutput, PipelineFailed, parse_selection, run_pipeline
from coordinator.recovery import RecoveryPolicy, Strategy
from coordinator.runfolder import RunFolder
from coordinator.team import TeamConfig
from coordinator.tracking import Tracker

pytestmark = pytest.mark.usefixtures("ray_local")

RAN: list[str] = []


def _team_phase(inputs, ctx):
    """Two independent tasks; ``bad`` always fails and its policy is retry then escalate."""
    RAN.append("t_team")
    policy = RecoveryPolicy(strategies=(Strategy.retry, Strategy.escalate), retry_attempts=2, retry_backoff_s=0.01)
    spec = TeamSpec(name="esc", agents=(AgentSpec(role="t-broken", num_cpus=0.25), AgentSpec(role="t-sum", num_cpus=0.25)),
                    tasks=(TaskSpec(name="bad", role="t-broken", policy=policy), TaskSpec(name="ok", role="t-sum", payload=1)))
    result = run_team(ctx, spec, TeamConfig(heartbeat_interval_s=0.5))
    return PhaseOutput(metrics={"outputs": len(result.outputs)})


def _after_phase(inputs, ctx):
    RAN.append("t_after")
    return PhaseOutput(metrics={"ran": 1})


@pytest.fixture
def team_phases():
    pipeline.ordered_phases()
    pipeline.register_phase("t_team", number=93, title="test team", consumes="none")(_team_phase)
    pipeline.register_phase("t_after", number=94, title="test after", consumes="none")(_after_phase)
    RAN.clear()
    yield
    PHASES.pop("t_team")
    PHASES.pop("t_after")


def _run(tmp_path, failure: str):
    cfg = PipelineConfig(on_phase_failure=failure, wandb=WandbConfig(mode="disabled"))
    run = RunFolder(tmp_path / failure)
    plan = parse_selection(["t_team", "t_after"])
    run.create(run_id=f"esc-{failure}", config=cfg.model_dump(mode="json"), seed=cfg.seed, plan=[s.name for s in plan])
    return run, lambda: run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"))


def _check_failure(run: RunFolder, then: str) -> None:
    result, _ = run.verify_result(93, "t_team")
    assert result is not None and not result.success
    f = result.failure
    assert f is not None and f["type"] == "escalation"
    assert (f["team"], f["task"], f["role"], f["kind"]) == ("esc", "bad", "t-broken", "app_error")
    assert f["tried"] == ["retry"] and f["then"] == then
    assert "EscalationError" in result.error
    event = [e for e in run.read_state()["events"] if e["phase"] == "t_team"][-1]
    assert event["state"] == "failed" and event["then"] == then and event["failure"]["task"] == "bad"
    assert (run.work_dir(93, "t_team") / "teams" / "esc" / "health" / "report.json").exists()


def test_abort_stops_the_pipeline_at_the_escalating_phase(tmp_path, team_phases):
    run, go = _run(tmp_path, "abort")
    with pytest.raises(PipelineFailed, match="escalated"):
        go()
    assert RAN == ["t_team"], "the next phase did not run"
    _check_failure(run, "abort")


def test_continue_runs_the_next_phase_and_records_the_failure(tmp_path, team_phases):
    run, go = _run(tmp_path, "continue")
    results = go()
    assert RAN == ["t_team", "t_after"]
    assert [r.success for r in results] == [False, True]
    _check_failure(run, "continue")
