"""Phase 7 on a real local Ray: the nine-agent ADAS team searches and certifies a deployment of a
small trained model; agent kills do not change the chosen model; an impossible profile fails the
phase naming the requirements no candidate met. The tests that run the team are slow (about 60 s
each on 2 cores); the default run certifies on the README's tiny run instead (tests/e2e/test_cli.py
checks the certificate, the nine agents, the report and the W&B metrics there), runs the whole
search in one process (tests/phases/test_adas_inline.py), and keeps the refusals below, which
fails before any agent starts (the agents' CPU check, shared with phases 6 and 8, is tested
there)."""

from __future__ import annotations

import json

import pytest

from coordinator import pipeline
from phases.adas.certificate import verify_certificate
from tests.coordinator.team_phases import registered, run_after_stand_in, trained_phase

# Lean on purpose (the tiny preset's settings run in the e2e README run).
ADAS = {"generations": 2, "population": 3, "backends": ["eager", "onnxruntime"], "repeats": 5, "token_repeats": 1,
        "warmup": 1, "eval_batch_size": 4, "eval_batches": 1, "calibration_windows": 2, "ffn_keep": [0.5],
        "low_rank": [0.5]}


def _run(root, adas=None, chaos=None):
    return run_after_stand_in(root, "adas", adas={**ADAS, **(adas or {})}, chaos=chaos or {})


@pytest.fixture(scope="module")
def trained():
    yield from registered(trained_phase(max_seq_len=64))


@pytest.fixture(scope="module")
def clean_run(trained, ray_local, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("clean"))


def _model_and_report(result) -> dict[str, str]:
    """The chosen model and the report (functions of the config and seed); the certificate holds
    this run's timings, so it differs between runs by design."""
    return {**{m.path: m.sha256 for m in result.models}, "report": result.artifacts["report"].sha256}


@pytest.mark.slow
def test_the_phase_deploys_and_certifies_the_winner(clean_run):
    run, results = clean_run
    result = results[-1]
    assert result.success, result.error
    phase = run.phase_dir(7, "adas")
    verify_certificate(phase / "certificate" / "certificate.json")
    cert = json.loads((phase / "certificate" / "certificate.json").read_text())
    assert cert["passed"] and cert["profile"] == "edge-cpu"
    timings = json.loads((phase / "timings.json").read_text())
    assert len(timings["archive"]) == 6 and timings["winner"] is not None
    winner = timings["archive"][timings["winner"]]
    assert winner["passed"] and cert["candidate"] == winner["key"]
    for c in timings["archive"]:  # every candidate: lineage, verdict, the reasons of a rejection
        assert c["passed"] == (not c["reasons"]) and c["origin"] in ("seed", "mutation", "crossover",
                                                                     "crossover+mutation", "random")
    m = result.metrics
    assert m["adas/candidates"] == 6 and m["adas/reload_equals_measured"] is True
    tables = json.loads((phase / "tables.json").read_text())
    assert {"candidates", "requirements", "input_vs_winner"} <= set(tables)
    assert {"pareto.json", "latency.json"} <= {p.name for p in phase.iterdir()}


@pytest.mark.slow
def test_agent_kills_do_not_change_the_chosen_model(clean_run, ray_local, tmp_path):
    """The runtime's chaos settings kill ADAS agents mid-phase: the search measures nothing twice
    (stored measurements are reused on replay) and chooses the same model. Default-run siblings:
    tests/chaos/ (random agent kills never change a team's outputs)."""
    _, clean = clean_run
    _, chaotic = _run(tmp_path, chaos={"kill_rate": 0.2, "seed": 2})
    result = chaotic[-1]
    assert result.success, result.error
    assert result.metrics["adas/team_faults_injected"] >= 1 and result.metrics["adas/team_recoveries"] >= 1
    assert _model_and_report(result) == _model_and_report(clean[-1])


@pytest.mark.slow
def test_an_impossible_profile_fails_naming_what_no_candidate_met(trained, ray_local, tmp_path):
    impossible = {"profiles": {"impossible": {"call_p99_ms": 0.01, "backends": ["eager", "onnxruntime"],
                                              "precisions": ["fp32", "int8"], "threads": [1]}},
                  "profile": "impossible", "generations": 1}
    with pytest.raises(pipeline.PipelineFailed) as err:
        _run(tmp_path, adas=impossible)
    assert err.value.phase == "adas" and "no candidate of 3 met every requirement" in err.value.reason
    assert "none met: call_p99_ms" in err.value.reason and "0/3 met" in err.value.reason
    unmet = json.loads((tmp_path / "run" / "07_adas" / "unmet.json").read_text())
    assert unmet["none_met"] == ["call_p99_ms"] and unmet["requirements"]["call_p99_ms"]["limit"] == 0.01
    assert not (tmp_path / "run" / "07_adas" / "models" / "adas").exists()
    assert not (tmp_path / "run" / "07_adas" / "certificate").exists()


def test_a_profile_this_machine_cannot_run_is_refused_before_the_team_starts(trained, tmp_path):
    """cloud-gpu needs CUDA: without it the phase fails naming the profile and the device, before
    it needs Ray (this test starts none)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(pipeline.PipelineFailed) as err:
        _run(tmp_path, adas={"profile": "cloud-gpu", "backends": None})
    assert err.value.phase == "adas"
    assert "profile 'cloud-gpu' cannot run here" in err.value.reason and "cuda" in err.value.reason
    assert not (tmp_path / "run" / "07_adas" / "work" / "teams").exists(), "no agent started"
