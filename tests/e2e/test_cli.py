"""End to end through the `agentforge` CLI, as a user runs it: the README's main command,
SIGKILL mid-run then resume with equal hashes, status/report, and clear failures."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, agentforge_cmd, cli_env


def readme_main_command() -> list[str]:
    """The `agentforge run ...` part of the README's first quickstart command."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart-run -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert block, "README must mark its main quickstart command with <!-- quickstart-run -->"
    line = block.group(1).strip()
    assert line.count("\n") == 0, "the main quickstart is exactly one command"
    run_part = [p.strip() for p in line.split("&&") if p.strip().startswith("agentforge")]
    assert run_part, f"no agentforge command in {line!r}"
    return shlex.split(run_part[0])


def _model_hashes(run_dir: Path) -> dict[str, str]:
    out = {}
    for result in sorted(run_dir.glob("[0-9][0-9]_*/result.json")):
        data = json.loads(result.read_text())
        assert data["success"], data["error"]
        for m in data["models"]:
            out[m["path"]] = m["sha256"]
        for name, a in data["artifacts"].items():
            out[f"{result.parent.name}:{name}"] = a["sha256"]
    return out


def _agentforge(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*agentforge_cmd(), *args], cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The README's main command, run as written (W&B offline, embedded local Ray)."""
    cwd = tmp_path_factory.mktemp("readme")
    argv = readme_main_command()
    assert argv[:2] == ["agentforge", "run"]
    env = cli_env()
    env.pop("WANDB_MODE")  # exercise the config's default: offline
    proc = subprocess.run([*agentforge_cmd(), *argv[1:], "--out", "run"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "run", proc


def test_readme_main_command_writes_the_run_folder(reference_run):
    run_dir, proc = reference_run
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["plan"] and all(state["phases"][p]["state"] == "done" for p in state["plan"])
    hashes = _model_hashes(run_dir)
    assert hashes, "the run produced model artifacts"
    assert (run_dir / "report.html").read_text().count("<svg") >= 1, "the report plots the training curves"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == len(state["plan"]), "one offline W&B run per phase"


def test_the_tiny_run_ends_in_a_compressed_model(reference_run):
    """Phase 8 on the README run: the quantization strategy on BitNet's model with every codec;
    the model is the package (loaded through its compressed form), the report plots the Pareto
    front, ONNX matches."""
    from phases.compression.package import load_model

    run_dir, _ = reference_run
    result = json.loads((run_dir / "08_compress" / "result.json").read_text())
    assert result["success"], result["error"]
    m = result["metrics"]
    model = load_model(run_dir / result["model"]["path"])
    assert model.config.vocab_size == 260  # the byte vocabulary + phase 3's start/end-of-thought tokens
    assert m["compression/ratio_vs_fp32"] > 4 and m["compression/gate_passed"] is True
    for codec in ("ternary", "int8", "int4", "vptq", "seedlm"):
        assert f"compression/{codec}/ratio_vs_fp32" in m and f"compression/{codec}/retention" in m, codec
    assert m["compression/onnx_max_abs_diff"] < 1e-3
    report = json.loads((run_dir / "08_compress" / "compression_report.json").read_text())
    assert not report["stages"]  # quantization only: no prune or distill stage
    assert "compression: Pareto front" in (run_dir / "report.html").read_text()
    assert "compression: profile" in (run_dir / "report.html").read_text()
    # the phase's metrics went to W&B (offline: the run's log holds the keys)
    logs = [p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")]
    assert any(b"compression/ratio_vs_fp32" in b and b"compression/retention" in b for b in logs)


def test_the_tiny_run_trains_thoughts(reference_run):
    """Phase 3 on the README run (its driver on the embedded Ray): a thought model that loads and
    generates, measured metrics every 5 steps, and the sample thoughts in tables.json, the
    report and the offline W&B run."""
    import torch

    from phases.quietstar.model import load_thought_model

    run_dir, _ = reference_run
    result = json.loads((run_dir / "03_quietstar" / "result.json").read_text())
    assert result["success"], result["error"]
    m = result["metrics"]
    assert m["quietstar/steps"] == 40 and m["quietstar/injection_points"] == 15
    for key in ("eval_loss_input", "eval_loss_base", "eval_loss_thought", "thought_coherence_avg"):
        assert 0 < m[f"quietstar/{key}"] < 10, key
    model, tokenizer = load_thought_model(run_dir / result["model"]["path"])
    ids, thoughts = model.generate(torch.tensor([tokenizer.encode("The ")]), max_new_tokens=3,
                                   return_thoughts=True)
    assert ids.shape == (1, len(tokenizer.encode("The ")) + 3) and len(thoughts) == 3
    phase_dir = run_dir / "03_quietstar"
    rows = json.loads((phase_dir / "tables.json").read_text())["thought_examples"]
    assert len(rows) == 8 and json.loads((phase_dir / "quietstar_thought_examples.json").read_text()) == rows
    history = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(5, 41, 5)) and "quietstar/mixing_weight_alpha" in history[0]
    report = (run_dir / "report.html").read_text()
    assert "<h3>thought_examples</h3>" in report and all(html.escape(r["next_tokens"]) in report for r in rows)
    (table,) = (run_dir / "wandb").glob("offline-run-*/files/media/table/thought_examples_*.table.json")
    logged = json.loads(table.read_text())
    assert set(logged["columns"]) == set(rows[0]) and len(logged["data"]) == 8


def test_the_tiny_run_quantizes_to_ternary(reference_run):
    """Phase 4 on the README run: the packed model stores its ternary layers at 1.6 bits per
    weight and reloads to the QAT model's predictions; the HF export holds exactly ternary
    matrices, which phase 8 then stores with its lossless ternary codec."""
    import torch
    from transformers import AutoModelForCausalLM

    from phases.bitnet.packed import PackedBitLinear, load_packed

    run_dir, _ = reference_run
    result = json.loads((run_dir / "04_bitnet" / "result.json").read_text())
    assert result["success"], result["error"]
    m = result["metrics"]
    assert m["bitnet/ternary_bits_per_weight"] <= 1.67 and m["bitnet/compression_ratio"] > 2
    assert m["bitnet/calibration_samples"] == 100 and m["bitnet/steps"] == 60
    assert m["bitnet/accuracy_retention"] > m["bitnet/accuracy_retention_before_qat"], "QAT recovers accuracy"
    assert m["bitnet/packed_max_abs_logit_diff"] == 0.0  # the packed model computes as the QAT model
    packed = load_packed(run_dir / result["artifacts"]["packed_model"]["path"])
    assert sum(isinstance(x, PackedBitLinear) for x in packed.modules()) == m["bitnet/ternary_layers"]
    export = AutoModelForCausalLM.from_pretrained(run_dir / result["model"]["path"])
    assert len(export.config.bitnet["layers"]) == m["bitnet/ternary_layers"]
    for name in export.config.bitnet["layers"]:
        assert torch.unique(export.get_submodule(name).weight.abs()).numel() <= 2, name  # {0, scale}
    report = json.loads((run_dir / "04_bitnet" / "bitnet_performance_report.json").read_text())
    assert report["packed"]["quality"]["token_accuracy"] == pytest.approx(m["bitnet/token_accuracy"])
    compress = json.loads((run_dir / "08_compress" / "result.json").read_text())["metrics"]
    assert "compression/ternary/ratio_vs_fp32" in compress


def test_the_tiny_run_forges_the_ternary_model(reference_run):
    """Phase 5 on the README run: BitNet's model trained quantization-aware through the four
    stages (each logged every step) to a lower held-out loss; the output is still exactly
    ternary where phase 4 made it so."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, _ = reference_run
    result = json.loads((run_dir / "05_forge" / "result.json").read_text())
    assert result["success"], result["error"]
    m = result["metrics"]
    assert m["forge/training_steps"] == 100 and m["forge/quantization_aware"] == 1
    assert m["forge/dream_cycles"] == 0  # dream cycles, self-modeling, edge control, Grokfast: off by default
    assert m["forge/val_loss"] < m["forge/val_loss_input"], "training lowers the held-out loss"
    history = [json.loads(line) for line in (run_dir / "05_forge" / "metrics.jsonl").read_text().splitlines()]
    staged = [r for r in history if "forge/stage" in r]
    assert [r["step"] for r in staged] == list(range(1, 101))
    assert not any("forge/self_model_loss" in r or "forge/edge_control_success_rate" in r for r in history)
    assert [r["forge/stage"] for r in staged] == [0] * 10 + [1] * 40 + [2] * 30 + [3] * 20
    summary = json.loads((run_dir / "05_forge" / "forge_training_summary.json").read_text())
    assert summary["stages"] == {"warmup": [1, 10], "acceleration": [11, 50], "consolidation": [51, 80],
                                 "refinement": [81, 100]}
    model = AutoModelForCausalLM.from_pretrained(run_dir / result["model"]["path"])
    for name in model.config.bitnet["layers"]:
        assert torch.unique(model.get_submodule(name).weight.abs()).numel() <= 2, name  # {0, scale}


def test_the_tiny_run_bakes_tools_and_a_persona(reference_run):
    """Phase 6 on the README run: the nine-agent team bakes the tools and the persona into
    Forge's model, measured before and after on held-out questions; the package for phase 7
    carries the tool registry and the persona; the baked model is still exactly ternary where
    phase 4 made it so (phase 8 stores it as such); the metrics reached W&B."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir, _ = reference_run
    result = json.loads((run_dir / "06_baking" / "result.json").read_text())
    assert result["success"], result["error"]
    m = result["metrics"]
    # the tiny model learns to call the tools (which one, when) but not yet to copy the operands
    # into them (README, "Tool and persona baking"): the choice is what its short bake moves
    assert m["baking/after/tool_choice_accuracy"] > m["baking/before/tool_choice_accuracy"]
    assert 0.0 <= m["baking/after/tool_call_accuracy"] <= 1.0
    assert m["baking/persona/kl_reduction"] > 1.0 and m["baking/gate_passed"] is True
    assert m["baking/tool_data/kept"] >= 1 and m["baking/tool_data/errors"] >= 1
    assert any(k.startswith("baking/health/") for k in m)
    package = run_dir / result["model"]["path"]
    assert {"tools.json", "knowledge.json", "persona.json", "tokenizer.json"} <= {p.name for p in package.iterdir()}
    assert set(json.loads((package / "tools.json").read_text())["tools"]) == {"calculator", "lookup"}
    assert json.loads((package / "persona.json").read_text())["traits"] == {"helpfulness": 0.9, "creativity": 0.7,
                                                                            "precision": 0.8}
    phase = run_dir / "06_baking"
    health = json.loads((phase / "work" / "teams" / "baking" / "health" / "report.json").read_text())
    assert len(health["agents"]) == 9 and all(a["calls"] >= 1 for a in health["agents"].values())
    timings = json.loads((phase / "timings.json").read_text())
    assert set(timings["profile"]) == {"input", "baked", "optimised"}
    for name in ("fuse_qkv", "fold_norms", "all"):  # each rewrite: parity checked, applied only when it helps
        g = timings["graph"][name]
        assert g["reason"] and g["applied"] == (g["parity"] and g["speedup"] >= 1.10), name
    assert m["baking/memory/activation_reduction"] > 1.0  # checkpointing saves activations (measured)
    deployment = json.loads((phase / "deployment.json").read_text())
    assert deployment["graph_rewrites"] == timings["graph"]["chosen"] and deployment["threads"] >= 1
    model = AutoModelForCausalLM.from_pretrained(package)
    for name in model.config.bitnet["layers"]:
        assert torch.unique(model.get_submodule(name).weight.abs()).numel() <= 2, name  # {0, scale}
    compress = json.loads((run_dir / "08_compress" / "result.json").read_text())
    assert compress["metrics"]["compression/input_fp32_bytes"] > 0
    report = (run_dir / "report.html").read_text()
    assert "<h3>before_after</h3>" in report and "<h3>optimisations</h3>" in report and "tool-call accuracy" in report
    logs = [p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")]
    assert any(b"baking/after/tool_call_accuracy" in b and b"baking/health/" in b for b in logs)


def test_the_tiny_run_certifies_a_deployment_for_edge_cpu(reference_run):
    """Phase 7 on the README run: the nine-agent ADAS team searches deployment recipes of the
    baked model for the edge-cpu profile; the winner met every requirement, is smaller or faster
    than the input within the allowed accuracy loss, and comes with a certificate whose every
    number re-derives from its evidence files; phase 8 compressed the winner's model; the
    Pareto front and latency distributions reached the report, the metrics W&B."""
    from phases.adas.certificate import verify_certificate
    from phases.adas.runtime import load_runner

    run_dir, _ = reference_run
    phase = run_dir / "07_adas"
    result = json.loads((phase / "result.json").read_text())
    assert result["success"], result["error"]
    m = result["metrics"]
    assert m["adas/certified"] is True and m["adas/candidates"] >= 4 and m["adas/front_size"] >= 1
    assert m["adas/winner/retention"] >= 0.95  # edge-cpu's accuracy floor
    assert m["adas/size_ratio"] > 1.0 or m["adas/speedup_p95"] > 1.0, "smaller or faster than the input"
    assert m["adas/reload_equals_measured"] is True and any(k.startswith("adas/health/") for k in m)
    cert = json.loads((phase / "certificate" / "certificate.json").read_text())
    assert cert["passed"] and cert["profile"] == "edge-cpu" and cert["machine"]["cpu_count"] >= 1
    names = {r["name"] for r in cert["requirements"]}
    assert {"call_p95_ms", "call_p99_ms", "token_p95_ms", "memory_mb", "disk_mb", "parity",
            "accuracy_retention"} <= names
    verify_certificate(phase / "certificate" / "certificate.json")
    runner = load_runner(phase / "deployment")  # the deployed artifact runs as certified
    assert runner.backend == cert["recipe"]["backend"] and runner.precision == cert["recipe"]["precision"]
    health = json.loads((phase / "work" / "teams" / "adas" / "health" / "report.json").read_text())
    assert len(health["agents"]) == 9 and all(a["calls"] >= 1 for a in health["agents"].values())
    model = phase / "models" / "adas"
    assert {"tools.json", "persona.json", "tokenizer.json", "config.json"} <= {p.name for p in model.iterdir()}
    compress = json.loads((run_dir / "08_compress" / "result.json").read_text())
    assert compress["inputs"] == [{"path": result["model"]["path"], "sha256": result["model"]["sha256"]}]
    report = (run_dir / "report.html").read_text()
    assert "adas (edge-cpu): candidates and Pareto front" in report and "latency distributions" in report
    assert "<h3>requirements</h3>" in report and "<h3>candidates</h3>" in report
    logs = [p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")]
    assert any(b"adas/winner/call_p95_ms" in b and b"adas/health/" in b for b in logs)


def test_status_json_reads_the_run(reference_run):
    run_dir, _ = reference_run
    proc = _agentforge("status", str(run_dir), "--json", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert [p["state"] for p in status["phases"]] == ["done"] * len(status["phases"])
    assert status["phases"][0]["metrics"]["model/total_params"] > 0


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_gives_identical_hashes(reference_run, tmp_path):
    """SIGKILL the driver (and its embedded Ray) in the middle of EvoMerge's search, resume: the
    search continues from its last completed generation, and every model and artifact of the
    run equals the uninterrupted run's bit for bit. Phase 1 is taken from the reference run
    (its own mid-phase resume is tested in tests/phases/test_cognate_train.py); the resume stops
    after phase 2 (``--until evomerge``; phase 8's determinism under agent kills is tested in
    tests/coordinator/test_compress_phase.py). Slow (about 100 s on 2 cores: the resumed search);
    default-run siblings: the search's resume from its checkpoint through the pipeline runner
    (tests/coordinator/test_evomerge_phase.py) and every training phase's bit-identical resume
    (tests/phases/test_*_train.py)."""
    run_dir, _ = reference_run
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed, ignore=shutil.ignore_patterns("02_evomerge", "03_quietstar", "04_bitnet",
                                                          "05_forge", "06_baking", "07_adas", "08_compress", "wandb",
                                                          "report.html"))
    state = killed / "02_evomerge" / "work" / "evolution.json"
    proc = subprocess.Popen([*agentforge_cmd(), "resume", str(killed), "--wandb", "disabled"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make the tiny search longer"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray with it
    proc.wait(timeout=30)
    assert not (killed / "02_evomerge" / "result.json").exists()
    saved = json.loads(state.read_text())["evolution"]
    assert saved["generation"] >= 1 and saved["history"], "killed after a completed generation"

    resumed = _agentforge("resume", str(killed), "--until", "evomerge", "--wandb", "disabled", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert re.search(r"phase 1 cognate: skipped, result and \d+ artifact\(s\) verified", resumed.stderr)
    assert "evomerge: resuming after generation" in resumed.stderr
    assert not (killed / "03_quietstar" / "result.json").exists(), "--until evomerge stops after phase 2"
    reference = {k: v for k, v in _model_hashes(run_dir).items()
                 if not k.startswith(("03_quietstar", "04_bitnet", "05_forge", "06_baking", "07_adas", "08_compress"))}
    assert _model_hashes(killed) == reference, "resumed run must equal the uninterrupted one bit for bit"



def _main_in_process(argv: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """The CLI's ``main`` in this process (the error paths need no Ray; a subprocess would spend
    ~9 s importing torch and transformers before failing)."""
    from coordinator.cli import main

    monkeypatch.chdir(cwd)
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: -1\ncognat: {}\n")
    code, err = _main_in_process(["run", str(cfg)], tmp_path, capsys, monkeypatch)
    assert code == 2
    assert "seed" in err and "cognat" in err and "did you mean 'cognate'" in err
    assert not (tmp_path / "runs").exists(), "nothing is created for an invalid config"


def test_unbuilt_phase_fails_with_a_clear_reason(tmp_path, capsys, monkeypatch, unbuilt_phase):
    code, err = _main_in_process(["run", "--phases", unbuilt_phase], tmp_path, capsys, monkeypatch)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert unbuilt_phase in last and "not built yet" in last and "issue #999" in last


def test_resume_until_a_phase_not_in_the_run_names_the_runs_phases(reference_run, capsys, monkeypatch,
                                                                   unbuilt_phase):
    run_dir, _ = reference_run
    before = _model_hashes(run_dir)
    code, err = _main_in_process(["resume", str(run_dir), "--until", unbuilt_phase], run_dir.parent, capsys,
                                 monkeypatch)
    assert code == 2
    assert f"--until '{unbuilt_phase}'" in err
    assert "1 cognate, 2 evomerge, 3 quietstar, 4 bitnet, 5 forge, 6 baking, 7 adas, 8 compress" in err
    assert _model_hashes(run_dir) == before


def test_unknown_preset_lists_presets(tmp_path, capsys, monkeypatch):
    code, err = _main_in_process(["run", "--preset", "huge"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "tiny" in err


@pytest.mark.slow
def test_phase_command_runs_one_phase(reference_run, tmp_path):
    """`agentforge phase evomerge --models A B C`: merging any HF models on their own (here the
    README run's three Cognate variants; no base model named, so the first is the base).
    Default-run siblings: the phase tests in tests/coordinator/test_evomerge_phase.py and
    test_phase_command_refuses_unbuilt_phases (the command's own path)."""
    run_dir, _ = reference_run
    result = json.loads((run_dir / "01_cognate" / "result.json").read_text())
    models = [str(run_dir / m["path"]) for m in result["models"]]
    proc = _agentforge("phase", "evomerge", "--models", *models, "--out", "two", "--wandb", "disabled",
                       "--set", "evomerge.population=4", "--set", "evomerge.max_generations=1",
                       "--set", "evomerge.eval_batches=1", "--set", "evomerge.eval_tasks=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "two" / "02_evomerge" / "result.json").read_text())
    assert result["success"] and result["metrics"]["evomerge/generations"] == 1
    recipe = json.loads((tmp_path / "two" / "02_evomerge" / "recipe.json").read_text())
    assert len(recipe["models"]) == 3 and not any("(base)" in n for n in recipe["model_names"])


def test_phase_command_refuses_unbuilt_phases(reference_run, tmp_path, capsys, monkeypatch, unbuilt_phase):
    run_dir, _ = reference_run
    model = json.loads((run_dir / "02_evomerge" / "result.json").read_text())["model"]["path"]
    code, err = _main_in_process(["phase", unbuilt_phase, "--models", str(run_dir / model), "--out", "three"],
                                 tmp_path, capsys, monkeypatch)
    assert code == 1 and unbuilt_phase in err and "not built yet" in err
    assert not (tmp_path / "three" / "97_t_unbuilt").exists()


def test_loaded_model_generates(reference_run):
    """Every output dir is an HF model: AutoModelForCausalLM.from_pretrained + generate work."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import phases.cognate.modeling  # noqa: F401 - registers model_type "cognate" with the Auto classes

    run_dir, _ = reference_run
    result = json.loads((run_dir / "01_cognate" / "result.json").read_text())
    path = run_dir / result["model"]["path"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The Python", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert torch.equal(out[:, : ids.shape[1]], ids)
