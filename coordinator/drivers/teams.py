"""Running an agent team inside a phase: what the baking, ADAS and compression drivers share.

:func:`run_team` names the actors ``RUNID/team/role``, keeps the team's checkpoints and health
log under the phase's ``work/teams/<team>/`` (so a resumed phase finds them), applies the
pipeline's ``chaos`` section, logs the ``health/<team>/...`` metrics to W&B, and returns the
:class:`~coordinator.team.TeamResult`. An escalation propagates as
:class:`~coordinator.recovery.EscalationError`; the runner records it in the phase's
result.json (``failure``) and aborts or continues as ``on_phase_failure`` says.
"""

from __future__ import annotations

from actors.base import TeamSpec
from coordinator.errors import PhaseError
from coordinator.pipeline import PhaseContext
from coordinator.team import Team, TeamConfig, TeamResult

__all__ = ["check_fits", "run_team", "team_metrics"]


def check_fits(spec: TeamSpec, phase: str) -> None:
    """Refuse a team whose agents reserve more CPUs than the Ray cluster has, before any starts
    (else they would wait for resources forever), naming the setting to lower.

    Raises:
        PhaseError: naming ``<phase>.agent_cpus``.
    """
    import ray

    need, have = sum(a.num_cpus for a in spec.agents), float(ray.cluster_resources().get("CPU", 0.0))
    if need > have + 1e-9:
        each = spec.agents[0].num_cpus
        raise PhaseError(phase, f"the team's {len(spec.agents)} agents reserve {need:g} CPUs "
                                f"({phase}.agent_cpus={each:g} each), the Ray cluster has {have:g}; "
                                f"lower {phase}.agent_cpus")


def run_team(ctx: PhaseContext, spec: TeamSpec, config: TeamConfig | None = None) -> TeamResult:
    """Run ``spec``'s task graph to completion under ``config`` (default supervision).

    Raises:
        EscalationError: a task's policy escalated; the team was stopped first.
        GraphError: the task graph is invalid (before any actor starts).
    """
    run_id = ctx.run.read_state()["run_id"]
    team = Team(spec, run_id=run_id, work_dir=ctx.work_dir / "teams" / spec.name, config=config,
                chaos=ctx.config.chaos, seed=ctx.seed)
    with team:
        result = team.run()
    ctx.log(result.metrics, None)
    return result


def team_metrics(prefix: str, result: TeamResult, team: str) -> dict[str, float | int | bool]:
    """The team's part of a phase's metrics: ``<prefix>/team_faults_injected``,
    ``<prefix>/team_recoveries`` and its health (``health/<team>/...`` as ``<prefix>/health/...``)."""
    metrics: dict[str, float | int | bool] = {f"{prefix}/team_faults_injected": len(result.faults),
                                              f"{prefix}/team_recoveries": len(result.decisions)}
    for key, value in result.metrics.items():
        metrics[f"{prefix}/health/" + key.removeprefix(f"health/{team}/")] = value
    return metrics
