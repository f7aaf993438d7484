"""Phase 1 training on a tiny model: loss goes down, one basin, deterministic bytes, exact resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.errors import ArtifactError, ConfigError, PhaseError
from phases.cognate import CognateConfig, count_params, specialize, warmup
from phases.data import DataConfig, load_corpus

CFG = CognateConfig(target_params=None, vocab_size=None, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                    memory_slots=16, memory_chunk=8, max_seq_len=64, warmup_steps=60, steps=8, batch_size=8,
                    lr=3e-3, lr_warmup_steps=5, checkpoint_every=20, eval_batches=1, eval_tasks=4, loss_window=10)
VARIANTS = ("reasoning", "memory", "adaptive")
ROOT = Path(__file__).resolve().parents[2]


class Crash(Exception):
    """Stands for a process that dies after a checkpoint."""


def crash_at(step):
    def progress(done, total):
        if done == step:
            raise Crash(done)
    return progress


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig(seq_len=32), seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("cognate")
    logs = []
    base = warmup(CFG, corpus, seed=0, work_dir=root / "work" / "base", out_dir=root / "base",
                  log=lambda metrics, step: logs.append((step, metrics)))
    metrics = {v: specialize(v, base, CFG, corpus, seed=0, work_dir=root / "work" / v, out_dir=root / v)
               for v in VARIANTS}
    return root, logs, metrics


def test_warmup_loss_goes_down_and_logs(run):
    _, logs, _ = run
    steps = [s for s, _ in logs]
    assert steps == [10, 20, 30, 40, 50, 60, 60]  # every log_every steps, then the evaluation
    final = logs[-1][1]
    assert final["warmup/loss"] < final["warmup/loss_initial"] - 1.5, final
    assert final["warmup/perplexity"] < 40 and math.isfinite(final["warmup/tasks_accuracy"])


def test_outputs_are_hf_dirs_with_variant_settings(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = run
    expected = {"base": (0.95, False), "reasoning": (0.95, False), "memory": (0.90, True), "adaptive": (0.99, False)}
    for name, (threshold, memory) in expected.items():
        files = {p.name for p in (root / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        cfg = json.loads((root / name / "config.json").read_text())
        assert (cfg["model_type"], cfg["variant"], cfg["act_threshold"], cfg["memory_enabled"]) == (
            "cognate", name, threshold, memory)
    model = AutoModelForCausalLM.from_pretrained(str(root / "memory"))
    tok = AutoTokenizer.from_pretrained(str(root / "memory"))
    out = model.generate(**tok("The ", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_variants_stay_in_the_base_basin(run):
    root, _, _ = run
    base = load_file(str(root / "base" / "model.safetensors"))
    for name in VARIANTS:
        tensors = load_file(str(root / name / "model.safetensors"))
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in base.items()}
        memory_same = all(torch.equal(tensors[k], base[k]) for k in base if k.startswith("model.memory."))
        assert memory_same == (name != "memory")  # only the memory variant trains its memory
        assert not torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_specialisation_metrics_are_measured(run, corpus):
    _, _, metrics = run
    total = count_params(vocab_size=corpus.tokenizer.vocab_size, d_model=32, n_layers=2, d_ff=64, memory_slots=16)
    for name, m in metrics.items():
        assert m["model/total_params"] == m["model/trainable_params"] == total
        assert m["model/act_threshold"] == CFG.variants[name].act_threshold
        assert m["training/steps"] == 8 and m["eval/ponder_steps"] <= CFG.act_max_steps_infer
        assert 1 <= m["training/ponder_steps"] <= CFG.act_max_steps_train
        assert all(math.isfinite(v) for v in m.values())
        assert {"training/loss", "training/perplexity", "tasks/accuracy", "tasks/accuracy/tool"} <= set(m)
    assert metrics["memory"]["training/tokens"] == 2 * metrics["reasoning"]["training/tokens"]  # longer context


_SUBPROCESS = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from phases.cognate import warmup
from phases.data import DataConfig, load_corpus
from tests.phases.test_cognate_train import CFG
out = Path(sys.argv[1])
warmup(CFG, load_corpus(DataConfig(seq_len=32), seed=0), seed=0, work_dir=out / "work", out_dir=out / "base")
"""


def test_same_config_and_seed_give_identical_bytes_in_another_process(run, corpus, tmp_path):
    root, _, _ = run
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different hash seed must not matter
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(tmp_path / "base") == digests(root / "base")
    warmup(CFG.model_copy(update={"warmup_steps": 20}), corpus, seed=1, work_dir=tmp_path / "w1",
           out_dir=tmp_path / "other")
    assert digests(tmp_path / "other")["model.safetensors"] != digests(root / "base")["model.safetensors"]


def test_resume_after_a_crash_gives_bit_identical_weights(run, corpus, tmp_path):
    root, _, metrics = run
    cfg = CFG.model_copy(update={"checkpoint_every": 4})  # cadence is not part of the math
    with pytest.raises(Crash):
        warmup(cfg, corpus, seed=0, work_dir=tmp_path / "wb", out_dir=tmp_path / "base", progress=crash_at(44))
    assert not (tmp_path / "base").exists()
    assert sorted(p.name for p in (tmp_path / "wb").glob("*.json")) == ["ckpt-00000040.json", "ckpt-00000044.json"]
    seen = []
    warmup(cfg, corpus, seed=0, work_dir=tmp_path / "wb", out_dir=tmp_path / "base",
           progress=lambda done, total: seen.append(done))
    assert seen[0] == 44 and seen[-1] == 60  # resumed, not restarted
    assert digests(tmp_path / "base") == digests(root / "base")
    with pytest.raises(Crash):
        specialize("memory", root / "base", cfg, corpus, seed=0, work_dir=tmp_path / "wm", out_dir=tmp_path / "m",
                   progress=crash_at(5))
    resumed = specialize("memory", root / "base", cfg, corpus, seed=0, work_dir=tmp_path / "wm",
                         out_dir=tmp_path / "m")
    assert digests(tmp_path / "m") == digests(root / "memory")
    assert resumed == metrics["memory"]


def test_a_checkpoint_from_other_inputs_is_refused(corpus, tmp_path):
    cfg = CFG.model_copy(update={"checkpoint_every": 2, "warmup_steps": 4})
    with pytest.raises(Crash):
        warmup(cfg, corpus, seed=0, work_dir=tmp_path / "w", out_dir=tmp_path / "b", progress=crash_at(2))
    with pytest.raises(PhaseError, match="different config, seed"):
        warmup(cfg, corpus, seed=1, work_dir=tmp_path / "w", out_dir=tmp_path / "b")


def test_bad_inputs_raise_named_errors(run, corpus, tmp_path):
    root, _, _ = run
    with pytest.raises(ConfigError, match="configured variants: reasoning, memory, adaptive"):
        specialize("poetry", root / "base", CFG, corpus, seed=0, work_dir=tmp_path / "w", out_dir=tmp_path / "o")
    with pytest.raises(ArtifactError, match="config.json: missing"):
        specialize("memory", tmp_path, CFG, corpus, seed=0, work_dir=tmp_path / "w", out_dir=tmp_path / "o")
    with pytest.raises(ConfigError) as err:
        warmup(CFG.model_copy(update={"max_seq_len": 16}), corpus, seed=0, work_dir=tmp_path / "w",
               out_dir=tmp_path / "o")
    assert err.value.problems[0][0] == "max_seq_len"
    with pytest.raises(ConfigError) as err:
        CognateConfig(lr=0, variants={"memory": {"act_threshold": 1.2}}, act_max_steps_infer=9)
    keys = {k for k, _ in err.value.problems}
    assert keys == {"lr", "variants.memory.act_threshold"}  # cross-field checks wait for valid fields
    with pytest.raises(ConfigError) as err:
        CognateConfig(act_max_steps_infer=9)
    assert err.value.problems == [("act_max_steps_infer", "must be <= act_max_steps_train (8), got 9")]


def test_a_torn_checkpoint_falls_back_to_the_previous_one(run, corpus, tmp_path):
    root, _, _ = run
    cfg = CFG.model_copy(update={"checkpoint_every": 4})
    with pytest.raises(Crash):
        warmup(cfg, corpus, seed=0, work_dir=tmp_path / "w", out_dir=tmp_path / "b", progress=crash_at(56))
    newest = tmp_path / "w" / "ckpt-00000056.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # a bit flip the recorded sha256 catches
    newest.write_bytes(bytes(data))
    seen = []
    with pytest.warns(UserWarning, match="trying an older checkpoint"):
        warmup(cfg, corpus, seed=0, work_dir=tmp_path / "w", out_dir=tmp_path / "b",
               progress=lambda done, total: seen.append(done))
    assert seen[0] == 52
    assert digests(tmp_path / "b") == digests(root / "base")
