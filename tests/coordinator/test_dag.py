"""Task graph validation and the scheduler state machine (no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.dag import GraphError, Scheduler, TaskGraph, TaskSpec, TaskState
from coordinator.errors import ConfigError

ROLES = ("loader", "trainer", "judge")


def diamond() -> TaskGraph:
    """a -> (b, c) -> d, plus an independent branch x -> y."""
    return TaskGraph([
        TaskSpec("a", "loader"),
        TaskSpec("b", "trainer", ("a",)),
        TaskSpec("c", "trainer", ("a",)),
        TaskSpec("d", "judge", ("b", "c")),
        TaskSpec("x", "loader"),
        TaskSpec("y", "judge", ("x",)),
    ], ROLES)


def test_graph_reports_every_problem_at_once():
    with pytest.raises(GraphError) as info:
        TaskGraph([
            TaskSpec("a", "loader"),
            TaskSpec("a", "loader"),  # duplicate
            TaskSpec("b", "trainr", ("a",)),  # unknown role
            TaskSpec("c", "judge", ("a", "zz")),  # missing input
            TaskSpec("d", "judge", ("a",), fallback_role="nobody"),  # unknown fallback role
            TaskSpec("e", "judge", ("f",)),  # cycle e -> f -> e
            TaskSpec("f", "judge", ("e",)),
        ], ROLES)
    err = info.value
    assert isinstance(err, ConfigError)
    problems = dict(err.problems)
    assert "duplicate task name 'a'" in problems["tasks.a"]
    assert "unknown role 'trainr'" in problems["tasks.b.role"]
    assert "did you mean 'trainer'" in problems["tasks.b.role"]
    assert "known roles: judge, loader, trainer" in problems["tasks.b.role"]
    assert "task 'c' needs input 'zz'" in problems["tasks.c.inputs"]
    assert "unknown fallback role 'nobody'" in problems["tasks.d.fallback_role"]
    cycle = problems["tasks"]
    assert cycle in ("cycle: e -> f -> e", "cycle: f -> e -> f")
    assert len(err.problems) == 5
    for key, _ in err.problems:  # the one-line message names them all too
        assert key in str(err)


def test_self_dependency_is_a_cycle():
    with pytest.raises(GraphError, match=r"cycle: a -> a"):
        TaskGraph([TaskSpec("a", "loader", ("a",))], ROLES)


def test_graph_relations_and_order():
    g = diamond()
    order = g.topological_order()
    assert order == ["a", "x", "b", "c", "y", "d"]  # batches by depth, declaration order within
    for name in order:
        assert all(order.index(d) < order.index(name) for d in g[name].inputs)
    assert g.dependents("a") == ["b", "c"]
    assert g.descendants("a") == ["b", "c", "d"]
    assert g.ancestors("d") == ["a", "b", "c"]
    assert g.ancestors("a") == [] and g.descendants("d") == []
    with pytest.raises(KeyError, match="no task 'q'"):
        g.descendants("q")
    # Ties break by declaration order, not by name, so a run replays in the same order.
    g2 = TaskGraph([TaskSpec("zeta", "loader"), TaskSpec("beta", "judge", ("zeta",)),
                    TaskSpec("alpha", "loader")], ROLES)
    assert g2.topological_order() == ["zeta", "alpha", "beta"]
    assert [t.name for t in Scheduler(g2).ready()] == ["zeta", "alpha"]


def test_ready_tasks_come_together_and_in_order():
    s = Scheduler(diamond())
    assert [t.name for t in s.ready()] == ["a", "x"]  # independent roots are ready at once
    assert [t.name for t in s.ready()] == ["a", "x"]  # ready() does not mark them
    s.start("a")
    s.start("x")
    assert s.ready() == []
    s.done("a", 1)
    assert [t.name for t in s.ready()] == ["b", "c"]  # concurrent siblings
    s.start("b")
    s.start("c")
    s.done("b", 2)
    assert s.ready() == []  # d needs c too
    s.done("c", 3)
    assert [t.name for t in s.ready()] == ["d"]
    assert s.inputs_of("d") == {"b": 2, "c": 3}
    s.start("d")
    s.done("d", 4)
    s.done("x", 5)
    s.start("y")
    assert not s.finished
    s.done("y", 6)
    assert s.finished
    assert s.summary()["done"] == 6
    assert dict(s.outputs) == {"a": 1, "b": 2, "c": 3, "d": 4, "x": 5, "y": 6}


def test_invalid_transitions_are_refused():
    s = Scheduler(diamond())
    with pytest.raises(ValueError, match="inputs not done"):
        s.start("b")
    with pytest.raises(ValueError, match="it is PENDING, needs RUNNING"):
        s.done("a", 1)
    s.start("a")
    with pytest.raises(ValueError, match="it is RUNNING"):
        s.start("a")
    with pytest.raises(ValueError, match="FAILED or ISOLATED"):
        s.fail("a", "x", TaskState.DONE)


def test_failure_marks_descendants_upstream_failed_and_other_branches_keep_running():
    s = Scheduler(diamond())
    s.start("a")
    s.start("x")
    s.done("a", 1)
    s.start("b")
    s.start("c")
    s.done("b", 2)
    marked = s.fail("c", "trainer raised ValueError: boom")
    assert marked == ["d"]
    assert s.states["c"] is TaskState.FAILED
    assert s.states["d"] is TaskState.UPSTREAM_FAILED
    assert s.causes["d"] == "upstream task 'c' failed: trainer raised ValueError: boom"
    assert s.states["b"] is TaskState.DONE  # a finished sibling keeps its output
    assert not s.finished  # x is still running
    s.done("x", 5)
    assert [t.name for t in s.ready()] == ["y"]  # the independent branch goes on
    s.start("y")
    s.done("y", 6)
    assert s.finished
    assert s.summary() == {"pending": 0, "running": 0, "done": 4, "failed": 1, "upstream_failed": 1, "isolated": 0}


def test_isolated_task_and_first_cause_wins():
    s = Scheduler(diamond())
    assert s.fail("a", "agent 'loader' isolated: breaker open", TaskState.ISOLATED) == ["b", "c", "d"]
    assert s.states["a"] is TaskState.ISOLATED
    assert s.causes["b"] == "upstream task 'a' failed (isolated): agent 'loader' isolated: breaker open"
    s.start("x")
    assert s.fail("x", "boom") == ["y"]
    assert s.finished
    assert s.summary()["isolated"] == 1 and s.summary()["upstream_failed"] == 4


def test_reset_for_replay_clears_outputs_and_revives_dependents():
    s = Scheduler(diamond())
    s.start("a")
    s.done("a", 1)
    s.start("b")
    s.done("b", 2)
    s.start("c")
    s.fail("c", "boom")
    assert s.states["d"] is TaskState.UPSTREAM_FAILED
    # Rollback to the checkpoint after a: replay b and c (d comes back because its only failed
    # ancestor was reset).
    assert s.reset(["b", "c"]) == ["b", "c", "d"]
    assert "b" not in s.outputs and "c" not in s.causes and "d" not in s.causes
    assert s.outputs["a"] == 1
    assert [t.name for t in s.ready()] == ["x", "b", "c"]
    s.start("b")
    s.done("b", 20)
    s.start("c")
    s.done("c", 30)
    s.start("d")
    assert s.inputs_of("d") == {"b": 20, "c": 30}
    # A running task that is reset refuses its late result.
    s.reset(["d"])
    with pytest.raises(ValueError, match="cannot finish task 'd'"):
        s.done("d", 99)


@st.composite
def dags(draw):
    n = draw(st.integers(1, 12))
    tasks = []
    for i in range(n):
        inputs = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        tasks.append(TaskSpec(f"t{i}", ROLES[i % 3], tuple(f"t{j}" for j in inputs)))
    fails = draw(st.sets(st.integers(0, n - 1)))
    picks = draw(st.lists(st.integers(0, 10_000), min_size=4 * n, max_size=4 * n))
    return tasks, {f"t{i}" for i in fails}, picks


@settings(max_examples=150, deadline=None)
@given(dags())
def test_random_dags_end_done_or_failed(case):
    tasks, failing, picks = case
    graph = TaskGraph(tasks, ROLES)
    s = Scheduler(graph)
    running: list[str] = []
    picks = iter(picks)
    while not s.finished:
        ready = s.ready()
        for t in ready:  # nothing starts before its inputs are done
            assert all(s.states[d] is TaskState.DONE for d in t.inputs)
        if ready and (not running or next(picks, 0) % 2):
            t = ready[next(picks, 0) % len(ready)]
            s.start(t.name)
            running.append(t.name)
            continue
        name = running.pop(next(picks, 0) % len(running))  # finish one, in a random order
        if name in failing:
            s.fail(name, f"{name} broke")
        else:
            s.done(name, name.upper())
    final = dict(s.states)
    assert set(final.values()) <= {TaskState.DONE, TaskState.FAILED, TaskState.UPSTREAM_FAILED}
    for name, state in final.items():
        ancestors = graph.ancestors(name)
        if state is TaskState.DONE:
            assert name not in failing and all(final[a] is TaskState.DONE for a in ancestors)
            assert s.outputs[name] == name.upper()
        elif state is TaskState.FAILED:
            assert name in failing
        else:
            culprits = [a for a in ancestors if final[a] is TaskState.FAILED]
            assert culprits and s.causes[name].startswith("upstream task ")
            assert any(f"'{c}'" in s.causes[name] for c in culprits)
    assert sum(s.summary().values()) == len(graph)


@st.composite
def graphs_and_moves(draw):
    n = draw(st.integers(1, 12))
    tasks = [TaskSpec(f"t{i}", ROLES[i % 3], tuple(f"t{j}" for j in draw(st.sets(st.integers(0, i - 1), max_size=3))
                                                    ) if i else ()) for i in range(n)]
    moves = draw(st.lists(st.tuples(st.sampled_from(["start", "done", "fail", "reset"]), st.integers(0, n - 1)),
                          max_size=40))
    return TaskGraph(tasks, ROLES), moves


@settings(max_examples=200, deadline=None)
@given(graphs_and_moves())
def test_incremental_ready_set_equals_the_definition(case):
    """ready()/finished, kept incrementally, always equal their definitions over any transitions."""
    graph, moves = case
    sched = Scheduler(graph)
    for verb, i in moves:
        name = graph.order[i]
        try:
            if verb == "start":
                sched.start(name)
            elif verb == "done":
                sched.done(name, i)
            elif verb == "fail":
                sched.fail(name, "x")
            else:
                sched.reset([name])
        except ValueError:
            pass  # an illegal transition is refused and changes nothing
        states = sched.states
        naive = [n for n in graph.order if states[n] is TaskState.PENDING
                 and all(states[d] is TaskState.DONE for d in graph[n].inputs)]
        assert [t.name for t in sched.ready()] == naive
        assert sched.finished == (not naive and TaskState.RUNNING not in states.values())
