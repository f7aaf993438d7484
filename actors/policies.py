"""Recovery policies the agent teams share (phases 6 and 8): their tasks are idempotent (each
writes files named after itself), so a task whose agent was lost is retried, then the agent is
restarted (the roles are stateless); a task that declares a simpler algorithm falls back to it
on any other failure, then escalates. Kills never fall back: they are retried, so a kill cannot
change which algorithm a task used."""

from __future__ import annotations

from coordinator.recovery import FailureKind, RecoveryPolicy, Strategy

__all__ = ["FALLBACK_POLICY", "LOST", "TASK_POLICY"]

LOST = (FailureKind.actor_died, FailureKind.actor_unavailable, FailureKind.timeout, FailureKind.node_died)
TASK_POLICY = RecoveryPolicy(strategies=(Strategy.retry, Strategy.restart), retry_on=LOST, retry_attempts=6,
                             retry_backoff_s=0.1, retry_max_backoff_s=2.0, retry_total_s=600.0, restart_intensity=10)
FALLBACK_POLICY = TASK_POLICY.model_copy(update={"strategies": (Strategy.retry, Strategy.restart, Strategy.fallback,
                                                                 Strategy.escalate)})
