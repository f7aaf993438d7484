"""The ADAS team's task graph (actors/adas/graph.py): nine agents each with work, one chain of
tasks per generation, the profiler timing alone, and the certificate after the deployment."""

from __future__ import annotations

from actors.adas.graph import AGENTS, adas_graph, adas_team
from actors.policies import TASK_POLICY
from coordinator.dag import TaskGraph
from phases.adas.config import AdasConfig

COMMON = {"input": "in", "work": "w", "out": "o", "deploy": "d", "certificate": "c", "phase_dir": "p", "seed": 1,
          "data": {}}


def test_nine_agents_each_with_work_in_a_valid_graph():
    spec = adas_team(AdasConfig(agent_cpus=0.25, generations=2), COMMON)
    assert [a.role for a in spec.agents] == list(AGENTS) and len(set(AGENTS)) == 9
    assert all(a.num_cpus == 0.25 for a in spec.agents)
    TaskGraph(spec.tasks, AGENTS)  # raises on unknown roles, missing inputs, cycles
    assert {t.role for t in spec.tasks} == set(AGENTS), "every agent has a task"
    assert all(t.policy is TASK_POLICY for t in spec.tasks)


def test_each_generation_breeds_from_the_previous_archive_and_the_profiler_times_alone():
    tasks = {t.name: t for t in adas_graph(AdasConfig(generations=3), COMMON)}
    assert len(tasks) == 1 + 3 * 6 + 3
    assert "archive-1" in tasks["propose-2"].inputs and "archive-0" not in tasks["propose-2"].inputs
    for g in range(3):
        # nothing else of the generation runs while profile-g times: it waits for build and evaluate
        assert {f"build-{g}", f"evaluate-{g}"} <= set(tasks[f"profile-{g}"].inputs)
        assert f"profile-{g}" in tasks[f"safety-{g}"].inputs and f"safety-{g}" in tasks[f"archive-{g}"].inputs
        if g:
            assert "safety-0" in tasks[f"safety-{g}"].inputs  # the reference's accuracy
    assert "archive-2" in tasks["deploy"].inputs and "deploy" in tasks["certify"].inputs
    assert tasks["plan"].payload["cfg"]["profile"] == "edge-cpu" and tasks["plan"].payload["input"] == "in"


def test_the_plain_data_roles_never_import_torch():
    """The proposer, safety monitor and archivist start cold and stay light (WARM says which
    roles import the heavy libraries): a proposal made in a fresh interpreter imports neither
    torch nor transformers."""
    import subprocess
    import sys

    from actors.adas.graph import WARM
    from tests.conftest import ROOT

    assert "architecture-proposer" not in WARM and "candidate-builder" in WARM
    code = (
        "import sys, json\n"
        "from actors.adas.roles import ArchitectureProposer, Archivist\n"
        "from phases.adas.recipes import Space\n"
        "space = Space(drop_layers=(0,), ffn_keep=(1.0,), low_rank=(1.0,), precision=('fp32', 'int8'),\n"
        "              backend=('eager',), threads=(1,), batch_size=(1,))\n"
        "payload = {'cfg': {'population': 2, 'decision': 'deterministic', 'mutation_rate': None}, 'seed': 0}\n"
        "plan = {'space': space.to_json(), 'reference': {'drop_layers': 0, 'ffn_keep': 1.0, 'low_rank': 1.0,\n"
        "        'precision': 'fp32', 'backend': 'eager', 'threads': 1, 'batch_size': 1}}\n"
        "out = ArchitectureProposer().handle('propose-0', payload, {'plan': plan})\n"
        "assert len(out['proposals']) == 2 and out['reference']['origin'] == 'reference'\n"
        "print(json.dumps(['torch' in sys.modules, 'transformers' in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[false, false]"
