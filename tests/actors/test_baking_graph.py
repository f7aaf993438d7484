"""The baking team's task graph (actors/baking/graph.py): nine agents each with work, a valid
acyclic graph whose dependencies carry what each task reads, and the fallbacks declared where
an optional measurement may fail."""

from __future__ import annotations

from actors.baking.graph import AGENTS, OPTIONAL_POLICY, TASK_POLICY, baking_graph, baking_team
from coordinator.dag import TaskGraph
from coordinator.recovery import Strategy
from phases.baking.config import BakingConfig

COMMON = {"input": "in", "work": "w", "out": "o", "phase_dir": "p", "seed": 1, "data": {}, "eval": {}}


def test_nine_agents_each_with_work_in_a_valid_graph():
    spec = baking_team(BakingConfig(agent_cpus=0.25), COMMON)
    assert [a.role for a in spec.agents] == list(AGENTS) and len(set(AGENTS)) == 9
    assert all(a.num_cpus == 0.25 for a in spec.agents)
    TaskGraph(spec.tasks, AGENTS)  # raises on unknown roles, missing inputs, cycles
    assert {t.role for t in spec.tasks} == set(AGENTS), "every agent has a task"


def test_dependencies_carry_what_each_task_reads():
    tasks = {t.name: t for t in baking_graph(BakingConfig(), COMMON)}
    # the fine-tunes read the kept data and the memory decision; the persona bakes the tool-baked model
    assert set(tasks["tool-bake"].inputs) == {"tool-data", "memory"}
    assert "tool-bake" in tasks["persona-bake"].inputs
    for name in ("graph", "accelerate", "validate-after", "profile", "package"):
        assert "persona-bake" in tasks[name].inputs, name
    assert "validate-after" in tasks["package"].inputs  # nothing is packaged before the gate
    assert set(tasks["report"].inputs) == set(tasks) - {"report"}
    assert tasks["plan"].payload["cfg"]["tools"] == ["calculator", "lookup"]
    assert tasks["plan"].payload["input"] == "in"


def test_optional_measurements_fall_back_and_kills_are_retried():
    tasks = {t.name: t for t in baking_graph(BakingConfig(), COMMON)}
    for name in ("graph", "accelerate"):
        assert tasks[name].policy is OPTIONAL_POLICY and tasks[name].fallback_payload["safe"] is True
        assert Strategy.fallback in OPTIONAL_POLICY.strategies
    rest = [t for n, t in tasks.items() if n not in ("graph", "accelerate")]
    assert all(t.policy is TASK_POLICY and t.fallback_payload is None for t in rest)
    assert TASK_POLICY.strategies[:2] == (Strategy.retry, Strategy.restart)


def test_the_three_teams_roles_share_one_registry_without_clashing():
    """Role names are global (one registry per process): a pipeline runs all three teams."""
    import actors.adas  # noqa: F401
    import actors.baking  # noqa: F401
    import actors.compression  # noqa: F401
    from actors.adas.graph import AGENTS as ADAS
    from actors.baking.graph import AGENTS as BAKING
    from actors.compression.graph import AGENTS as COMPRESSION
    from actors.roles import role_path

    assert all(role_path(r).startswith("actors.baking.") for r in BAKING)
    assert all(role_path(r).startswith("actors.compression.") for r in COMPRESSION)
    assert all(role_path(r).startswith("actors.adas.") for r in ADAS)
