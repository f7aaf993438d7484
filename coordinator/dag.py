"""Dependency-ordered scheduling state for an agent team: task specs, a validated graph, a scheduler.

A team's work is a DAG of :class:`TaskSpec` (each names its agent role and the tasks whose outputs
it consumes). :class:`TaskGraph` validates the whole graph before anything runs and reports every
problem at once; :class:`Scheduler` is a pure state machine the coordinator drives from its Ray
event loop: it says which tasks are ready, and records starts, outputs and failures. It never
runs anything itself (CONVENTIONS.md rule 6: decisions are values; only the coordinator acts).

Sources:
- ``graphlib.TopologicalSorter`` (Python 3.9+) for the order and cycle detection; a cycle raises
  ``CycleError(msg, cycle)`` whose second argument names the cycle. graphlib has no notion of
  failure, so failure propagation is ours.
- Airflow trigger rules: the default ``all_success`` runs a task once every upstream task
  succeeded; a failure marks its downstream tasks ``upstream_failed`` while independent branches
  keep running (airflow.apache.org, "Trigger Rules").
"""

from __future__ import annotations

import difflib
import enum
import graphlib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coordinator.errors import ConfigError

if TYPE_CHECKING:  # the policy type only annotates TaskSpec; importing it would pull in pydantic
    from coordinator.recovery import RecoveryPolicy

__all__ = ["GraphError", "Scheduler", "TaskGraph", "TaskSpec", "TaskState"]


@dataclass(frozen=True)
class TaskSpec:
    """One task of a team's graph.

    Attributes:
        name: unique within the graph.
        role: the agent role that runs it.
        inputs: names of the tasks whose outputs it consumes (it runs after all of them are DONE).
        payload: the task's own arguments (must be codec-encodable).
        timeout_s: deadline for one attempt (the coordinator enforces it with ``ray.wait``).
        policy: its recovery policy; None means the team's default policy.
        idempotent: True if running it twice is harmless; a non-idempotent task is retried only
            when its failure is known to have happened before it executed.
        fallback_role: an alternative role that can run it (the fallback strategy).
        fallback_payload: a simpler algorithm for the fallback strategy: the payload the task is
            sent with instead (to ``fallback_role`` if declared, else to its own role), e.g.
            ``{"method": "int8"}`` for a SeedLM task that is too slow.
        checkpoint: after it succeeds the team takes a "last good" checkpoint, the rollback target.
    """

    name: str
    role: str
    inputs: tuple[str, ...] = ()
    payload: Any = None
    timeout_s: float = 60.0
    policy: RecoveryPolicy | None = None
    idempotent: bool = True
    fallback_role: str | None = None
    fallback_payload: Any = None
    checkpoint: bool = False


class GraphError(ConfigError):
    """A task graph is invalid; ``problems`` lists every ``(key_path, message)`` found."""


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class TaskGraph:
    """A validated, immutable task graph.

    Args:
        tasks: the task specs, in declaration order (which breaks ties in every order below).
        roles: the team's role names (any iterable of str, e.g. a dict of role specs).
    Raises:
        GraphError: listing every problem at once: duplicate task names, unknown roles (with the
            known roles), missing inputs (naming the task and the missing name), unknown fallback
            roles, and a cycle (naming it).
    """

    def __init__(self, tasks: Iterable[TaskSpec], roles: Iterable[str]):
        tasks = list(tasks)
        self.roles: frozenset[str] = frozenset(roles)
        known_roles = ", ".join(sorted(self.roles)) or "(none)"
        problems: list[tuple[str, str]] = []

        by_name: dict[str, TaskSpec] = {}
        for i, spec in enumerate(tasks):
            if not isinstance(spec, TaskSpec):
                problems.append((f"tasks[{i}]", f"must be a TaskSpec, got {type(spec).__name__}"))
                continue
            if not spec.name or not isinstance(spec.name, str):
                problems.append((f"tasks[{i}].name", f"must be a non-empty string, got {spec.name!r}"))
                continue
            if spec.name in by_name:
                problems.append((f"tasks.{spec.name}", f"duplicate task name {spec.name!r}"))
                continue
            by_name[spec.name] = spec

        for name, spec in by_name.items():
            if spec.role not in self.roles:
                problems.append((f"tasks.{name}.role",
                                 f"unknown role {spec.role!r}{_hint(spec.role, self.roles)}; known roles: {known_roles}"))
            for dep in spec.inputs:
                if dep not in by_name:
                    hint = _hint(dep, by_name)
                    problems.append((f"tasks.{name}.inputs",
                                     f"task {name!r} needs input {dep!r}, which is not a task in the graph{hint}"))
            if spec.fallback_role is not None and spec.fallback_role not in self.roles:
                hint = _hint(spec.fallback_role, self.roles)
                problems.append((f"tasks.{name}.fallback_role",
                                 f"unknown fallback role {spec.fallback_role!r}{hint}; known roles: {known_roles}"))
            if spec.fallback_role is not None and spec.fallback_role == spec.role:
                problems.append((f"tasks.{name}.fallback_role", f"fallback role {spec.role!r} is the task's own role"))
            if not spec.timeout_s > 0:
                problems.append((f"tasks.{name}.timeout_s", f"must be > 0, got {spec.timeout_s!r}"))

        # Only known inputs go into the sorter: missing ones are reported above, and graphlib would
        # otherwise invent them as extra nodes.
        preds = {n: tuple(dict.fromkeys(d for d in s.inputs if d in by_name)) for n, s in by_name.items()}
        index = {n: i for i, n in enumerate(by_name)}
        order: list[str] = []
        sorter = graphlib.TopologicalSorter(preds)
        try:
            sorter.prepare()
        except graphlib.CycleError as err:
            cycle = list(err.args[1])
            problems.append(("tasks", f"cycle: {' -> '.join(cycle)}"))
        else:
            while sorter.is_active():
                batch = sorted(sorter.get_ready(), key=index.__getitem__)  # declaration order breaks ties
                order.extend(batch)
                sorter.done(*batch)

        if problems:
            summary = "; ".join(f"{k}: {m}" for k, m in problems)
            raise GraphError(f"invalid task graph ({len(problems)} problem(s)): {summary}", problems)

        self.tasks: Mapping[str, TaskSpec] = types.MappingProxyType(by_name)
        self.order: tuple[str, ...] = tuple(order)
        self._position = {n: i for i, n in enumerate(order)}
        children: dict[str, list[str]] = {n: [] for n in by_name}
        for n, ds in preds.items():
            for d in ds:
                children[d].append(n)
        self._children = {n: tuple(sorted(c, key=self._position.__getitem__)) for n, c in children.items()}
        self._parents = {n: tuple(sorted(ds, key=self._position.__getitem__)) for n, ds in preds.items()}

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, name: str) -> TaskSpec:
        return self.tasks[self._known(name)]

    def _known(self, name: str) -> str:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r} in the graph{_hint(name, self.tasks)}; tasks: {', '.join(self.order)}")
        return name

    def topological_order(self) -> list[str]:
        """Every task name, each after all its inputs (ties in declaration order)."""
        return list(self.order)

    def dependents(self, name: str) -> list[str]:
        """Tasks that consume ``name``'s output directly, in topological order."""
        return list(self._children[self._known(name)])

    def descendants(self, name: str) -> list[str]:
        """Every task downstream of ``name`` (transitively), in topological order."""
        return self._walk(name, self._children)

    def ancestors(self, name: str) -> list[str]:
        """Every task upstream of ``name`` (transitively), in topological order."""
        return self._walk(name, self._parents)

    def _walk(self, name: str, edges: Mapping[str, tuple[str, ...]]) -> list[str]:
        seen: set[str] = set()
        stack = list(edges[self._known(name)])
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(edges[n])
        return sorted(seen, key=self._position.__getitem__)


class TaskState(str, enum.Enum):
    """Where a task is. DONE and the three failed states are final until ``Scheduler.reset``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # recovery gave up on it
    UPSTREAM_FAILED = "upstream_failed"  # an input failed, so it was never run (Airflow's name)
    ISOLATED = "isolated"  # not run because its agent was isolated; failed for its dependents


_FAILED_STATES = frozenset({TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.ISOLATED})


class Scheduler:
    """The mutable run state of one pass over a :class:`TaskGraph`; pure and deterministic.

    The coordinator loop is: ``for t in ready(): start(t.name); submit...``, then ``done`` or
    ``fail`` as results arrive, until ``finished``. Transitions that make no sense (starting a task
    whose inputs are not done, finishing one that is not running) raise ``ValueError``: they are
    coordinator bugs, and silently accepting them would corrupt outputs.
    """

    def __init__(self, graph: TaskGraph):
        self.graph = graph
        self._states: dict[str, TaskState] = {n: TaskState.PENDING for n in graph.order}
        self._outputs: dict[str, Any] = {}
        self._causes: dict[str, str] = {}
        # Kept incrementally, so each transition costs O(its edges) and ready() O(ready tasks):
        # a pass over a graph of N tasks stays O(N log N), not O(N^2) (thousands of tasks).
        self._missing: dict[str, int] = {}  # task -> inputs not DONE yet
        self._ready: set[str] = set()  # PENDING tasks whose inputs are all DONE
        self._running = 0
        self._rebuild()

    def _rebuild(self) -> None:
        self._missing = {n: sum(1 for d in self.graph.tasks[n].inputs if self._states[d] is not TaskState.DONE)
                         for n in self.graph.order}
        self._ready = {n for n, k in self._missing.items() if k == 0 and self._states[n] is TaskState.PENDING}
        self._running = sum(1 for st in self._states.values() if st is TaskState.RUNNING)

    # -- views -------------------------------------------------------------------------------
    @property
    def states(self) -> Mapping[str, TaskState]:
        """Read-only view: task name -> state."""
        return types.MappingProxyType(self._states)

    @property
    def outputs(self) -> Mapping[str, Any]:
        """Read-only view: task name -> output, for DONE tasks."""
        return types.MappingProxyType(self._outputs)

    @property
    def causes(self) -> Mapping[str, str]:
        """Read-only view: task name -> why it failed, for the three failed states."""
        return types.MappingProxyType(self._causes)

    @property
    def finished(self) -> bool:
        """True when nothing is running and no pending task can become ready."""
        return self._running == 0 and not self._ready

    def summary(self) -> dict[str, int]:
        """Count of tasks per state (every state listed, zeros included), keyed by state value."""
        counts = {s.value: 0 for s in TaskState}
        for s in self._states.values():
            counts[s.value] += 1
        return counts

    def ready(self) -> list[TaskSpec]:
        """Pending tasks whose inputs are all DONE, in topological order; does not mark them."""
        position = self.graph._position
        return [self.graph.tasks[n] for n in sorted(self._ready, key=position.__getitem__)]

    def inputs_of(self, name: str) -> dict[str, Any]:
        """The outputs ``name`` consumes, keyed by input task name.

        Raises:
            ValueError: if an input is not DONE.
        """
        spec = self.graph[name]
        missing = [d for d in spec.inputs if self._states[d] is not TaskState.DONE]
        if missing:
            raise ValueError(f"task {name!r}: inputs not done yet: {', '.join(missing)}")
        return {d: self._outputs[d] for d in spec.inputs}

    # -- transitions -------------------------------------------------------------------------
    def _expect(self, name: str, allowed: tuple[TaskState, ...], verb: str) -> None:
        state = self._states[self.graph._known(name)]
        if state not in allowed:
            need = " or ".join(s.name for s in allowed)
            raise ValueError(f"cannot {verb} task {name!r}: it is {state.name}, needs {need}")

    def start(self, name: str) -> None:
        """Mark a ready task RUNNING.

        Raises:
            ValueError: if it is not PENDING or an input is not DONE.
        """
        self._expect(name, (TaskState.PENDING,), "start")
        self.inputs_of(name)  # raises if an input is not done
        self._states[name] = TaskState.RUNNING
        self._ready.discard(name)
        self._running += 1

    def done(self, name: str, output: Any = None) -> None:
        """Record a RUNNING task's output and mark it DONE.

        Raises:
            ValueError: if it is not RUNNING (e.g. a late result of a task that was reset).
        """
        self._expect(name, (TaskState.RUNNING,), "finish")
        self._states[name] = TaskState.DONE
        self._running -= 1
        self._outputs[name] = output
        for child in self.graph._children[name]:
            self._missing[child] -= 1
            if self._missing[child] == 0 and self._states[child] is TaskState.PENDING:
                self._ready.add(child)

    def fail(self, name: str, cause: str, state: TaskState = TaskState.FAILED) -> list[str]:
        """Mark a pending or running task failed and every pending descendant UPSTREAM_FAILED.

        Args:
            name: the task that failed for good (recovery gave up, or its agent was isolated).
            cause: why, in words; descendants get ``"upstream task 'name' failed: cause"``.
            state: FAILED, or ISOLATED when the task was not run because its agent was isolated.
        Returns:
            The descendants newly marked UPSTREAM_FAILED, in topological order. Descendants already
            failed keep their first cause; independent branches are untouched.
        Raises:
            ValueError: if ``state`` is not FAILED or ISOLATED, or the task is already final.
        """
        if state not in (TaskState.FAILED, TaskState.ISOLATED):
            raise ValueError(f"fail() takes state FAILED or ISOLATED, got {state!r}")
        self._expect(name, (TaskState.PENDING, TaskState.RUNNING), "fail")
        if self._states[name] is TaskState.RUNNING:
            self._running -= 1
        self._ready.discard(name)
        self._states[name] = state
        self._causes[name] = cause
        how = "failed" if state is TaskState.FAILED else "failed (isolated)"
        marked = []
        for d in self.graph.descendants(name):
            # A descendant cannot be RUNNING or DONE: it needs this task DONE first.
            if self._states[d] is TaskState.PENDING:
                self._states[d] = TaskState.UPSTREAM_FAILED
                self._causes[d] = f"upstream task {name!r} {how}: {cause}"
                marked.append(d)
        return marked

    def reset(self, names: Iterable[str]) -> list[str]:
        """Put tasks back to PENDING, clearing outputs and causes (for restart, rollback, replay).

        Tasks left UPSTREAM_FAILED only because of a task reset here come back to PENDING too, so a
        replay reaches them. DONE descendants are not reset: the caller names what to replay.

        Args:
            names: tasks to reset, in any state (a RUNNING one's late result will be refused).
        Returns:
            Every task that became PENDING, in topological order.
        """
        changed: set[str] = set()
        for n in names:
            if self._states[self.graph._known(n)] is not TaskState.PENDING:
                changed.add(n)
            self._states[n] = TaskState.PENDING
            self._outputs.pop(n, None)
            self._causes.pop(n, None)
        for n in self.graph.order:
            if self._states[n] is TaskState.UPSTREAM_FAILED and not any(
                    self._states[a] in (TaskState.FAILED, TaskState.ISOLATED) for a in self.graph.ancestors(n)):
                self._states[n] = TaskState.PENDING
                self._causes.pop(n, None)
                changed.add(n)
        self._rebuild()
        return [n for n in self.graph.order if n in changed]
