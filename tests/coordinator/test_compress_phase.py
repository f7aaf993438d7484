"""Phase 8 on a real local Ray: the nine-agent compression team turns a small trained model into
a package that loads through its compressed form; SeedLM over its budget falls back to int8;
agent kills do not change the hashes. (The hybrid strategy with every codec, the Pareto plot
and the ONNX export are checked on the README's tiny run, tests/e2e/test_cli.py.) The tests that
run the phase are slow (about 50 s on 2 cores); the default run compresses the README's tiny run
(tests/e2e/test_cli.py) and tests the fallback payload in tests/chaos/test_team.py."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator import pipeline
from coordinator.config import PipelineConfig
from coordinator.pipeline import PHASES, PhaseOutput, parse_selection, run_pipeline
from coordinator.runfolder import RunFolder
from coordinator.tracking import Tracker
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.train import save_model_dir
from phases.data import load_corpus
from tests.coordinator.team_phases import DATA, output_hashes, registered, run_after_stand_in, trained_phase

pytestmark = pytest.mark.usefixtures("ray_local")

# Lean on purpose (the full hybrid strategy runs in the e2e README run): quantization only, SeedLM
# with a budget it always overruns (so it falls back to int8, in both runs), no ONNX.
COMPRESS = {"strategy": "quantization", "codecs": ["int8", "int4", "seedlm"], "seedlm_max_seconds": 0.001,
            "search_trials": 4, "min_retention": 0.5, "eval_batch_size": 4, "eval_batches": 1, "eval_tasks": 4,
            "profile_repeats": 2, "onnx": False}
_trained = trained_phase(max_seq_len=64)


def _run(root, compress=None, chaos=None):
    return run_after_stand_in(root, "compress", compress={**COMPRESS, **(compress or {})}, chaos=chaos or {})


@pytest.fixture(scope="module")
def trained():
    yield from registered(_trained)


@pytest.fixture(scope="module")
def clean_run(trained, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("clean"))


_hashes = output_hashes


@pytest.mark.slow
def test_the_phase_returns_a_compressed_package_that_loads(clean_run):
    from phases.compression.package import load_model

    run, results = clean_run
    result = results[-1]
    assert result.success, result.error
    model_dir = run.resolve(result.model)
    assert (model_dir / "compressed.safetensors").exists() and (model_dir / "compression.json").exists()
    assert not (model_dir / "model.safetensors").exists(), "not the input model passed through"
    model = load_model(model_dir)
    ids = torch.randint(0, 200, (1, 16))
    assert model(input_ids=ids).logits.shape == (1, 16, model.config.vocab_size)
    m = result.metrics
    assert m["compression/ratio_vs_fp32"] > 4.0, m
    assert m["compression/retention"] >= COMPRESS["min_retention"] and m["compression/gate_passed"] is True
    assert m["compression/int4/ratio_vs_fp32"] > m["compression/int8/ratio_vs_fp32"]
    report = json.loads(run.resolve(result.artifacts["report"]).read_text())
    assert report["package"]["reload_equals_candidate"] is True
    assert set(report["codecs"]) == {"int8", "int4", "seedlm"}
    health = json.loads((run.phase_dir(8, "compress") / "work" / "teams" / "compress" / "health" / "report.json")
                        .read_text())
    assert len(health["agents"]) == 9, "all nine agents ran"
    profile = json.loads((run.phase_dir(8, "compress") / "timings.json").read_text())["profile"]
    front = {f"front-{t['number']:03d}" for t in report["front"]}
    assert front and set(profile) == {"input", "compressed", *(f"uniform-{c}" for c in ("int8", "int4")), *front}
    for name, p in profile.items():
        assert p["latency_ms_p50"] > 0 and p["bytes_on_disk"] > 0, name
    assert profile["compressed"]["bytes_on_disk"] < profile["input"]["bytes_on_disk"]


@pytest.mark.slow
def test_seedlm_over_its_budget_falls_back_to_int8(clean_run):
    result = clean_run[1][-1]
    assert result.metrics["compression/seedlm/fell_back_to"] == "int8"
    assert result.degraded and "seedlm" in result.degraded
    report = json.loads(clean_run[0].resolve(result.artifacts["report"]).read_text())
    assert report["codecs"]["seedlm"] == {"codec": "int8", "bits": report["codecs"]["int8"]["bits"],
                                          "fallback_from": "seedlm"}


@pytest.mark.slow
def test_agent_kills_do_not_change_the_output_hashes(clean_run, tmp_path):
    """The runtime's chaos settings kill compression agents mid-phase: every model and artifact
    equals the fault-free run's. Slow (a second phase-8 run, about 50 s on 2 cores); default-run
    siblings: tests/chaos/test_nodes.py (random agent kills across nodes never change a team's
    outputs) and tests/chaos/test_drill.py, on the same agent runtime."""
    _, clean = clean_run
    _, chaotic = _run(tmp_path, chaos={"kill_rate": 0.2, "seed": 2})
    result = chaotic[-1]
    assert result.success, result.error
    m = result.metrics
    assert m["compression/team_faults_injected"] >= 1 and m["compression/team_recoveries"] >= 1, m
    assert _hashes(result) == _hashes(clean[-1]), "outputs equal the fault-free run's"


def test_a_cluster_too_small_for_the_team_is_refused_naming_agent_cpus(trained, tmp_path):
    """Nine agents reserving 1 CPU each on the tests' 2-CPU Ray: the phase fails before any agent
    starts, naming the setting to lower (not a hang waiting for resources)."""
    with pytest.raises(pipeline.PipelineFailed) as err:
        _run(tmp_path, compress={"agent_cpus": 1.0})
    assert err.value.phase == "compress"
    assert "compress.agent_cpus" in err.value.reason and "9 agents reserve 9 CPUs" in err.value.reason
    assert not (tmp_path / "run" / "08_compress" / "models" / "compressed").exists()


def _ternarised(inputs, ctx):
    """A stand-in phase 4: the trained model with every linear layer but the LM head ternarised
    as BitNet b1.58 does (absmean, one scale per row)."""
    out = _trained(inputs, ctx)
    from phases.compression.ternary import ternarize_linears

    model = CognateForCausalLM.from_pretrained(out.model)
    ternarize_linears(model)
    corpus = load_corpus(DATA, seed=0)
    return PhaseOutput(model=save_model_dir(model.eval(), corpus.tokenizer, ctx.phase_dir / "models" / "bitnet"))


@pytest.mark.slow
def test_a_bitnet_input_gets_the_ternary_codec_and_keeps_its_ternary_weights_exactly(trained, tmp_path):
    """A ternary (phase-4-like) input: the driver adds the ternary codec, whose package stores
    every ternary matrix exactly, in 1.6 bits per weight plus one float32 scale per row. Default-run siblings: the codec and
    detection tests in tests/phases/test_compression_ternary.py."""
    from safetensors.torch import load_file

    from phases.compression.package import load_state_dict

    saved = PHASES.pop("t_trained")  # phase number 0 is the stand-in upstream phase's
    pipeline.register_phase("t_bitnet", number=0, title="ternary model", consumes="none")(_ternarised)
    try:
        cfg = PipelineConfig(seed=5, data=DATA, wandb={"mode": "disabled"},
                             compress={**COMPRESS, "codecs": ["int8"], "search_trials": 2})
        run = RunFolder(tmp_path / "run")
        plan = parse_selection(["t_bitnet", "compress"])
        run.create(run_id="bitnet", config=cfg.model_dump(mode="json"), seed=5, plan=[s.name for s in plan])
        results = run_pipeline(cfg, run, plan, tracker=Tracker(cfg.wandb, run, "r"))
    finally:
        PHASES.pop("t_bitnet")
        PHASES["t_trained"] = saved
    result = results[-1]
    assert result.success, result.error
    report = json.loads(run.resolve(result.artifacts["report"]).read_text())
    assert set(report["codecs"]) == {"ternary", "int8"}
    (src,) = run.phase_dir(0, "t_bitnet").glob("models/bitnet/*.safetensors")
    original = load_file(src)
    package = run.phase_dir(8, "compress") / "work" / "compress" / "quantize-ternary" / "package"
    stored = load_state_dict(package)
    meta = json.loads((package / "compression.json").read_text())["parameters"]
    from phases.compression.ternary import is_ternary

    ternary = [n for n, e in meta.items() if e.get("codec") == "ternary" and is_ternary(original[n])]
    assert len(ternary) >= 10, ternary  # the attention, MLP and memory projections
    for name in ternary:
        assert torch.equal(stored[name], original[name]), name
        rows, cols = original[name].shape
        assert meta[name]["bits_per_weight"] == (-(-rows * cols // 5) * 8 + rows * 32) / (rows * cols), meta[name]
    assert result.metrics["compression/ternary/ratio_vs_fp32"] > result.metrics["compression/int8/ratio_vs_fp32"]
