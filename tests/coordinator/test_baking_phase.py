"""Phase 6 on a real local Ray: the nine-agent baking team turns a small trained model into the
handoff package (baked model, tokenizer, tool registry, persona) with every role's effect
measured; agent kills do not change the hashes; a failed quality gate fails the phase naming
why. The tests that run the phase are slow (about 70 s on 2 cores); the default run bakes on the
README's tiny run instead (tests/e2e/test_cli.py checks the package, the nine agents, the
measurements and the W&B metrics there), and tests the parts in tests/phases/test_baking_*.py
and tests/actors/test_baking_graph.py."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator import pipeline
from phases.cognate.modeling import CognateForCausalLM
from tests.coordinator.team_phases import output_hashes, registered, run_after_stand_in, trained_phase

pytestmark = pytest.mark.usefixtures("ray_local")

# Lean on purpose (the tiny preset's settings run in the e2e README run): few questions and steps,
# no torch.compile; a gate any run passes (the gate's failure has its own test).
BAKING = {"tool_questions": 24, "eval_questions": 6, "tool_steps": 6, "persona_questions": 4, "persona_samples": 2,
          "persona_length": 8, "persona_steps": 3, "compile": False, "profile_repeats": 2, "profile_prompts": 4,
          "max_new_tokens": 24, "eval_batches": 1, "eval_batch_size": 4, "min_tool_gain": -1.0,
          "max_perplexity_ratio": 100.0, "filter_warmup_steps": 4}


def _run(root, baking=None, chaos=None):
    return run_after_stand_in(root, "baking", baking={**BAKING, **(baking or {})}, chaos=chaos or {})


@pytest.fixture(scope="module")
def trained():
    # 128 positions: the persona's teacher reads the prompt, a prefix and a continuation
    yield from registered(trained_phase(max_seq_len=128))


@pytest.fixture(scope="module")
def clean_run(trained, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("clean"))


_hashes = output_hashes


@pytest.mark.slow
def test_the_phase_returns_the_handoff_package(clean_run):
    from phases.baking.tools import KNOWLEDGE_PATH

    run, results = clean_run
    result = results[-1]
    assert result.success, result.error
    model_dir = run.resolve(result.model)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tools.json", "knowledge.json", "persona.json"):
        assert (model_dir / name).exists(), name
    assert json.loads((model_dir / "knowledge.json").read_text()) == json.loads(KNOWLEDGE_PATH.read_text())
    assert set(json.loads((model_dir / "tools.json").read_text())["tools"]) == {"calculator", "lookup"}
    persona = json.loads((model_dir / "persona.json").read_text())
    assert persona["traits"] == {"helpfulness": 0.9, "creativity": 0.7, "precision": 0.8}
    model = CognateForCausalLM.from_pretrained(model_dir)
    source = CognateForCausalLM.from_pretrained(run.phase_dir(0, "t_trained") / "models" / "m")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values())), \
        "the weights were baked, not passed through"
    deployment = json.loads((run.phase_dir(6, "baking") / "deployment.json").read_text())
    assert deployment["model"].endswith("models/baked") and deployment["threads"] >= 1


@pytest.mark.slow
def test_every_role_measured_its_effect(clean_run):
    run, results = clean_run
    m = results[-1].metrics
    for key in ("baking/before/tool_call_accuracy", "baking/after/tool_call_accuracy", "baking/before/task_accuracy",
                "baking/after/task_accuracy", "baking/persona/kl_before", "baking/persona/kl_after",
                "baking/perplexity_ratio", "baking/memory/activation_reduction", "baking/accelerate/batched_speedup",
                "baking/profile/optimised/latency_ratio", "baking/target/threads"):
        assert key in m, key
    assert 0.0 <= m["baking/after/tool_call_accuracy"] <= 1.0
    assert m["baking/persona/kl_before"] > 0 and m["baking/persona/kl_reduction"] == pytest.approx(
        m["baking/persona/kl_before"] / m["baking/persona/kl_after"])
    assert m["baking/tool_data/candidates"] >= BAKING["tool_questions"]  # every question yields a candidate
    assert m["baking/tool_data/errors"] >= 1  # the wrong-tool candidates the tools reject
    assert m["baking/memory/activation_reduction"] > 1.0  # checkpointing saves activations (measured)
    assert m["baking/gate_passed"] is True
    assert any(k.startswith("baking/health/") for k in m), "the team's health is in the phase's metrics"
    health = json.loads((run.phase_dir(6, "baking") / "work" / "teams" / "baking" / "health" / "report.json")
                        .read_text())
    assert len(health["agents"]) == 9, "all nine agents ran"
    timings = json.loads((run.phase_dir(6, "baking") / "timings.json").read_text())
    assert set(timings) >= {"target", "memory", "graph", "accelerate", "profile"}
    assert set(timings["profile"]) == {"input", "baked", "optimised"}
    for name in ("fuse_qkv", "fold_norms", "all"):  # each rewrite: parity checked, a reason either way
        g = timings["graph"][name]
        assert g["reason"] and g["parity"] == (g["max_abs_diff"] <= 1e-4), name  # parity is the logits' check
        assert g["applied"] == (g["parity"] and g["speedup"] >= 1.10), name
    tables = json.loads((run.phase_dir(6, "baking") / "tables.json").read_text())
    assert {"before_after", "optimisations"} <= set(tables)


@pytest.mark.slow
def test_agent_kills_do_not_change_the_output_hashes(clean_run, tmp_path):
    """The runtime's chaos settings kill baking agents mid-phase: the model and the report equal
    the fault-free run's. Default-run siblings: tests/chaos/ (random agent kills never change a
    team's outputs)."""
    _, clean = clean_run
    _, chaotic = _run(tmp_path, chaos={"kill_rate": 0.2, "seed": 2})
    result = chaotic[-1]
    assert result.success, result.error
    m = result.metrics
    assert m["baking/team_faults_injected"] >= 1 and m["baking/team_recoveries"] >= 1, m
    assert _hashes(result) == _hashes(clean[-1]), "outputs equal the fault-free run's"


@pytest.mark.slow
def test_a_failed_quality_gate_fails_the_phase_naming_why(trained, tmp_path):
    with pytest.raises(pipeline.PipelineFailed) as err:
        _run(tmp_path, baking={"min_tool_gain": 1.01})
    assert err.value.phase == "baking" and "quality gate" in err.value.reason
    assert "baking.min_tool_gain" in err.value.reason
    assert not (tmp_path / "run" / "06_baking" / "models" / "baked").exists()


@pytest.mark.slow
def test_a_cluster_too_small_for_the_team_is_refused_naming_agent_cpus(trained, tmp_path):
    """Nine agents reserving 1 CPU each on the tests' 2-CPU Ray: the phase fails before any agent
    starts, naming the setting to lower, and writes no package. Slow only for the suite's budget
    (a Ray start and a stand-in model): the default-run sibling is phase 8's refusal
    (tests/coordinator/test_compress_phase.py), through the same ``teams.check_fits``."""
    with pytest.raises(pipeline.PipelineFailed) as err:
        _run(tmp_path, baking={"agent_cpus": 1.0})
    assert err.value.phase == "baking"
    assert "baking.agent_cpus" in err.value.reason and "9 agents reserve 9 CPUs" in err.value.reason
    assert not (tmp_path / "run" / "06_baking" / "models" / "baked").exists()
