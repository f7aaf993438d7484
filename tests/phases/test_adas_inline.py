"""Phase 7's whole search on a tiny model in one process (``phases.adas.inline``): the archive,
the gates, the winner, the certificate and its verification."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.errors import ArtifactError
from phases.adas.certificate import machine, verify_certificate, write_certificate
from phases.adas.config import AdasConfig
from phases.adas.inline import run_search
from phases.adas.profiles import TargetProfile
from phases.adas.safety import Requirement
from tests.phases.tiny_cognate import tiny_cognate

pytestmark = pytest.mark.usefixtures("one_thread")

GENEROUS = TargetProfile(call_p95_ms=2000, call_p99_ms=2000, token_p99_ms=2000, memory_cap_mb=4096,
                         disk_cap_mb=100, min_accuracy_retention=0.0, max_parity_error=0.5,
                         precisions=("fp32", "int8"), backends=("eager", "onnxruntime"), threads=(1,),
                         call_tokens=8, prompt_tokens=4, new_tokens=2)
CFG = AdasConfig(generations=2, population=2, max_drop_layers=1, ffn_keep=(0.5,), low_rank=(0.5,),
                 calibration_windows=2, eval_batch_size=4, eval_batches=1, warmup=1, repeats=5, token_repeats=1)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 258, (4, 17), generator=gen)
    calibration = torch.randint(0, 258, (2, 16), generator=gen)
    return windows, calibration


@pytest.fixture(scope="module")
def generous(tmp_path_factory, data):
    windows, calibration = data
    work = tmp_path_factory.mktemp("adas")
    model = tiny_cognate(0, num_hidden_layers=3, memory_enabled=False)
    return work, run_search(model, GENEROUS, CFG, work_dir=work, calibration=calibration, windows=windows, seed=0)


def test_the_search_archives_every_candidate_with_evidence_and_lineage(generous):
    work, out = generous
    cands = out.archive.candidates
    assert len(cands) == 4 and len({c.key for c in cands}) == 4
    assert out.reference.metrics["retention"] is None and out.reference.origin == "reference"
    assert cands[0].origin == "seed" and cands[0].recipe == out.reference.recipe
    assert cands[0].metrics["retention"] == pytest.approx(1.0)
    for c in cands:
        assert c.error is None, c.error
        evidence = json.loads((work / "evidence" / f"{c.key}.json").read_text())
        assert evidence["metrics"]["call_p95_ms"] == c.metrics["call_p95_ms"]
        assert len(evidence["call_samples_ms"]) == CFG.repeats
        if c.generation == 1 and c.origin != "random":
            assert set(c.parents) <= {x.key for x in cands if x.generation == 0}


def test_the_winner_passed_and_is_the_smallest_that_did(generous):
    _, out = generous
    assert out.winner is not None
    win = out.archive.candidates[out.winner]
    assert win.passed and not win.reasons
    passed = [c for c in out.archive.candidates if c.passed]
    assert win.metrics["disk_bytes"] == min(c.metrics["disk_bytes"] for c in passed)
    assert win.metrics["disk_bytes"] < out.reference.metrics["disk_bytes"]


def test_the_certificate_holds_each_requirement_and_verifies_from_its_evidence(generous, tmp_path):
    work, out = generous
    win = out.archive.candidates[out.winner]
    evidence = json.loads((work / "evidence" / f"{win.key}.json").read_text())
    rows = [Requirement(**r) for r in evidence["requirements"]]
    (tmp_path / "evidence").mkdir()
    copy = tmp_path / "evidence" / f"{win.key}.json"
    copy.write_text((work / "evidence" / f"{win.key}.json").read_text())
    path = write_certificate(tmp_path, profile_name="generous", profile=GENEROUS.model_dump(mode="json"),
                             candidate=win.to_json(), rows=rows, artifact_dir=work / "artifacts" / win.key,
                             evidence={f"evidence/{win.key}.json": copy}, reference=out.reference.metrics,
                             machine_info=machine())
    cert = json.loads(path.read_text())
    assert cert["passed"] and {r["name"] for r in cert["requirements"]} >= {"call_p99_ms", "memory_mb", "disk_mb",
                                                                            "parity", "accuracy_retention"}
    assert cert["artifact"]["files"] and (tmp_path / "certificate.md").read_text().count("| pass |") == len(rows)
    verify_certificate(path)
    # a number that does not come from the evidence fails verification
    tampered = dict(cert)
    tampered["requirements"] = [dict(r, measured=0.001) if r["name"] == "call_p99_ms" else r
                                for r in cert["requirements"]]
    path.write_text(json.dumps(tampered))
    with pytest.raises(ArtifactError, match="call_p99_ms"):
        verify_certificate(path)
    path.write_text(json.dumps(cert))
    samples = json.loads(copy.read_text())
    samples["call_samples_ms"][0] += 1.0
    copy.write_text(json.dumps(samples))
    with pytest.raises(ArtifactError, match="altered"):
        verify_certificate(path)


def test_an_impossible_budget_rejects_every_candidate_naming_it(data, tmp_path):
    windows, calibration = data
    impossible = GENEROUS.model_copy(update={"call_p99_ms": 0.01, "call_p95_ms": 0.01})
    cfg = CFG.model_copy(update={"generations": 1, "population": 2})
    out = run_search(tiny_cognate(0, memory_enabled=False), impossible, cfg, work_dir=tmp_path,
                     calibration=calibration, windows=windows, seed=0)
    assert out.winner is None and len(out.archive) == 2
    for c in out.archive.candidates:
        assert not c.passed and any(r.startswith("call_p99_ms = ") and "<= 0.01 ms" in r for r in c.reasons)
