"""Phase 5 (phases/forge/): the curriculum's stages, the edge-of-chaos controller, the replay
buffer of dream cycles, the self-model, and the whole phase (train_forge) on a tiny Cognate
model and on a BitNet model: measured metrics, stages logged every step, early stopping,
bit-identical results after an interruption and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coordinator.errors import ConfigError
from phases.data import DataConfig, byte_tokenizer, load_corpus
from phases.data.tasks import pack_tasks
from phases.forge.config import CurriculumConfig, DreamConfig, EdgeConfig, ForgeConfig, SelfModelConfig
from phases.forge.curriculum import stage_at
from phases.forge.dream import ReplayBuffer, in_dream
from phases.forge.edge import EdgeController, task_successes
from phases.forge.selfmodel import SelfModel
from phases.forge.train import RECORD_FIELDS, train_forge
from serialization.checkpoint import sha256_dir
from tests.phases.resume_checks import foreign_checkpoint_is_refused, interrupt_then_resume
from tests.phases.tiny_cognate import tiny_cognate, tiny_model_dir

DATA = DataConfig(seq_len=24)
# every feature on, whatever the defaults
CFG = ForgeConfig(steps=12, batch_size=4, eval_every=4, checkpoint_every=4, eval_batches=1, eval_tasks=2,
                  grokfast={"enabled": True}, curriculum={"enabled": True}, self_model={"enabled": True},
                  dream={"enabled": True, "every": 5, "steps": 2, "buffer_size": 16},
                  edge={"enabled": True, "adjust_every": 2, "min_tasks": 1})


# -- curriculum ------------------------------------------------------------------------------------

def test_the_four_stages_split_the_steps_10_40_30_20():
    cfg = CurriculumConfig()
    stages = [stage_at(cfg, s, 100) for s in range(100)]
    names = [s.name for s in stages]
    assert names == ["warmup"] * 10 + ["acceleration"] * 40 + ["consolidation"] * 30 + ["refinement"] * 20
    assert [s.lr_scale for s in stages[:10]] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert all(s.lr_scale == 1.0 and s.grokfast for s in stages[10:50])
    assert all(s.lr_scale == pytest.approx(0.2) and not s.grokfast for s in stages[50:80])
    tail = [s.lr_scale for s in stages[80:]]
    assert tail[0] == pytest.approx(0.2) and all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < 0.01


def test_without_the_curriculum_one_schedule_with_grokfast_after_the_warmup():
    cfg = CurriculumConfig(enabled=False)
    stages = [stage_at(cfg, s, 50) for s in range(50)]
    assert {s.name for s in stages} == {"constant"}
    assert not any(s.grokfast for s in stages[:5]) and all(s.grokfast for s in stages[5:])
    assert stages[5].lr_scale == 1.0 and stages[-1].lr_scale < 0.01


def test_curriculum_shares_must_sum_to_one_and_steps_must_be_in_range():
    with pytest.raises(ConfigError, match="must be 1"):
        CurriculumConfig(warmup=0.2)
    with pytest.raises(ValueError, match="outside"):
        stage_at(CurriculumConfig(), 10, 10)


# -- edge of chaos ---------------------------------------------------------------------------------

def test_the_controller_moves_the_level_out_of_the_band_and_holds_it_inside():
    edge = EdgeController(EdgeConfig(adjust_every=2, min_tasks=4, start_level=2))
    edge.update([True] * 3, 0)
    edge.update([True, True, True, False], 1)  # 6/7 > 0.75: harder
    assert edge.level == 3 and edge.rate == pytest.approx(6 / 7) and edge.max_operand == 19
    edge.update([True, False], 2)
    edge.update([False, True, True, False, True], 3)  # 4/7 in [0.55, 0.75]: stays
    assert edge.level == 3
    edge.update([False, False], 4)
    edge.update([True, False, False], 5)  # 1/5 < 0.55: easier
    assert edge.level == 2
    edge.update([True], 6)
    edge.update([True], 7)  # 2 tasks < min_tasks: keeps counting, no decision
    assert edge.level == 2 and edge.scored == 2
    copy = EdgeController(EdgeConfig(adjust_every=2, min_tasks=4, start_level=0))
    copy.load_state_dict(edge.state_dict())
    assert (copy.level, copy.solved, copy.scored, copy.rate) == (edge.level, edge.solved, edge.scored, edge.rate)


def test_the_level_stays_within_the_levels():
    edge = EdgeController(EdgeConfig(levels=(9, 99), adjust_every=1, min_tasks=1))
    for step in range(4):
        edge.update([True], step)
    assert edge.level == 1
    for step in range(4, 8):
        edge.update([False], step)
    assert edge.level == 0


def test_task_successes_read_the_answer_spans_off_the_logits():
    targets = torch.tensor([[5, 6, 7, 8]])
    logits = torch.nn.functional.one_hot(torch.tensor([[5, 6, 0, 8]]), 10).float()
    # row positions: span [s, e) is predicted at inputs s-1 .. e-2, i.e. targets[s-1:e-1]
    assert task_successes(logits, targets, [(0, 1, 3), (0, 2, 4), (0, 4, 5)]) == [True, False, True]


def test_packed_task_spans_are_the_answers():
    tok = byte_tokenizer()
    spans: list[tuple[int, int]] = []
    ids = pack_tasks(np.random.default_rng(3), tok, 200, {"arithmetic": 0.5, "tool": 0.5}, max_operand=99,
                     max_modulus=7, spans=spans)
    assert len(spans) >= 3 and all(e <= 200 for _, e in spans)
    answers = [tok.decode(ids[s:e]) for s, e in spans]
    for answer in answers:  # each is a well-formed answer of its kind
        assert answer.lstrip("-").isdigit() or (answer.startswith("<tool>calculator(") and answer.endswith("</tool>"))
    for s, e in spans:  # and the prompt right before it asks for it
        assert tok.decode(ids[:s]).endswith(("=", "? ", "= "))
    plain = pack_tasks(np.random.default_rng(3), tok, 200, {"arithmetic": 0.5, "tool": 0.5}, max_operand=99,
                       max_modulus=7)
    assert plain == ids  # asking for spans does not change the row


@pytest.mark.parametrize("kw, match", [({"low": 0.8}, "below high"), ({"levels": (9, 9)}, "increasing"),
                                       ({"start_level": 9}, "past the last level")])
def test_edge_config_errors_name_the_problem(kw, match):
    with pytest.raises(ConfigError, match=match):
        EdgeConfig(**kw)


# -- dream cycles ----------------------------------------------------------------------------------

def test_dream_steps_follow_every_and_steps():
    assert [s for s in range(25) if in_dream(s, 10, 3)] == [10, 11, 12, 20, 21, 22]
    with pytest.raises(ConfigError, match="below every"):
        DreamConfig(every=5, steps=5)


def test_the_reservoir_holds_every_row_seen_with_equal_probability():
    """1000 rows offered 10 at a time to a 100-slot reservoir, over 80 seeds: each row is kept
    with probability 0.1; early and late rows alike (the sampling rule of dream.py)."""
    counts = np.zeros(1000)
    for seed in range(80):
        buf = ReplayBuffer(100, seed)
        for step in range(100):
            buf.add(torch.arange(step * 10, step * 10 + 10)[:, None], step)
        assert len(buf) == 100 and buf.seen == 1000
        counts[buf.rows[:, 0].numpy()] += 1
    per_tenth = counts.reshape(10, 100).sum(1) / (80 * 100)  # share of each tenth of the stream (sd 0.0034)
    assert np.allclose(per_tenth, 0.1, atol=0.015), per_tenth


def test_replay_is_deterministic_distinct_and_survives_a_checkpoint():
    buf = ReplayBuffer(8, seed=7)
    buf.add(torch.arange(30).reshape(10, 3), step=0)
    a = buf.sample(5, step=3)
    assert torch.equal(a, buf.sample(5, step=3)) and not torch.equal(a, buf.sample(5, step=4))
    assert len({tuple(r.tolist()) for r in a}) == 5
    copy = ReplayBuffer(8, seed=7)
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.sample(5, step=3), a) and copy.seen == 10
    with pytest.raises(RuntimeError, match="empty"):
        ReplayBuffer(4, 0).sample(2, 0)


# -- self-modeling ---------------------------------------------------------------------------------

def test_self_model_taps_scale_with_depth_and_train_the_earlier_layers_only():
    model = tiny_cognate(num_hidden_layers=4).train()  # 3 plain blocks + the final hidden: depth 4
    sm = SelfModel(model, SelfModelConfig().taps)
    assert sm.points == (0, 2, 3) and len(sm.heads) == 2  # round(4/3)=1, round(8/3)=3, 4 -> 0-based
    model(input_ids=torch.randint(0, 258, (2, 12)))
    loss = sm.loss()
    loss.backward()
    assert loss.item() > 0 and all(h.weight.grad.abs().sum() > 0 for h in sm.heads)
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0  # below a tap: shaped by it
    assert model.model.norm.weight.grad is None  # only in the last target's path, which is detached
    with torch.no_grad():
        model(input_ids=torch.randint(0, 258, (2, 12)))
    with pytest.raises(RuntimeError, match="without a forward"):
        sm.loss()  # no-grad forwards (evaluation) are not captured
    sm.remove()
    assert not model.model.layers[0]._forward_hooks


def test_self_model_needs_two_distinct_taps():
    with pytest.raises(ValueError, match="fewer than 2"):
        SelfModel(tiny_cognate(), (0.9, 1.0))  # depth 2: both round to the last point


# -- the whole phase -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DATA, seed=0)


@pytest.fixture(scope="module")
def input_dir(corpus, tmp_path_factory):
    return tiny_model_dir(corpus, tmp_path_factory.mktemp("forge-input") / "model")


def _run(input_dir, corpus, root, log=None, cfg=CFG):
    return train_forge(input_dir, cfg, corpus, seed=0, work_dir=root / "work", out_dir=root / "out", log=log)


@pytest.fixture(scope="module")
def forged(input_dir, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("forge")
    rows: list[tuple[int, dict]] = []
    out = _run(input_dir, corpus, root, log=lambda m, s: rows.append((s, m)))
    return root, out, rows


def test_the_phase_trains_and_measures(forged):
    from transformers import AutoModelForCausalLM

    root, out, rows = forged
    m = out["metrics"]
    assert m["forge/training_steps"] == 12 and m["forge/quantization_aware"] == 0
    assert m["forge/val_loss"] < m["forge/val_loss_input"]
    assert m["forge/dream_cycles"] == 2 and m["forge/dream_steps"] == 4  # steps 5-6 and 10-11 (0-based)
    assert 0 <= m["forge/train_task_success"] <= 1 and m["forge/grokfast_lambda"] == 2.0
    assert [s for s, _ in rows] == list(range(1, 13))  # every step is logged, with its stage
    assert [r["forge/stage"] for _, r in rows] == [0] + [1] * 5 + [2] * 4 + [3] * 2  # 10/40/30/20 of 12
    assert [r["forge/dream_cycle"] for _, r in rows] == [0.0] * 5 + [1.0] * 2 + [0.0] * 3 + [1.0] * 2
    assert [s for s, r in rows if "forge/val_loss" in r] == [4, 8, 12]
    assert all(r["forge/grokfast_lambda"] == (2.0 if r["forge/stage"] == 1 else 0.0) for _, r in rows)
    assert rows[9][1]["forge/training_throughput"] > 0 and rows[9][1]["forge/memory_usage_mb"] > 0
    report = out["report"]
    assert report["records"]["fields"] == list(RECORD_FIELDS) and len(report["records"]["rows"]) == 12
    assert [v[0] for v in report["validations"]] == [4, 8, 12]
    model = AutoModelForCausalLM.from_pretrained(root / "out")
    assert not any(n.startswith("self_model") for n, _ in model.named_parameters())  # training-only heads
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 258)


def test_interrupted_run_resumes_to_identical_weights(forged, input_dir, corpus, tmp_path):
    """Crash after step 6 (dream and acceleration state in flight), resume from the step-4
    checkpoint: the model equals the uninterrupted run's bit for bit, and so do the records."""
    root, out, _ = forged
    interrupt_then_resume(lambda r, log: _run(input_dir, corpus, r, log), tmp_path, crash_step=6,
                          checkpoints_left=["ckpt-00000004.json"])
    again = _run(input_dir, corpus, tmp_path)
    assert sha256_dir(tmp_path / "out") == sha256_dir(root / "out")
    assert again["report"]["records"] == out["report"]["records"]


def test_a_checkpoint_of_another_config_is_refused(forged, input_dir, corpus, tmp_path):
    root, _, _ = forged
    other = CFG.model_copy(update={"lr": 5e-4})
    foreign_checkpoint_is_refused(root / "work", tmp_path, lambda r: _run(input_dir, corpus, r, cfg=other))


def test_early_stopping_stops_restores_the_best_weights_and_a_resume_does_not_train_on(input_dir, corpus, tmp_path):
    cfg = CFG.model_copy(update={"patience": 1, "min_delta": 100.0})  # no validation can improve by 100
    out = _run(input_dir, corpus, tmp_path, cfg=cfg)
    m = out["metrics"]
    assert m["forge/early_stopped"] == 1 and m["forge/training_steps"] == 8 and m["forge/best_step"] == 4
    assert m["forge/val_loss"] == m["forge/best_val_loss"] == out["report"]["validations"][0][1]  # step 4's weights
    first = sha256_dir(tmp_path / "out")
    again = _run(input_dir, corpus, tmp_path, cfg=cfg)  # resumes the stopped run's last checkpoint
    assert again["metrics"]["forge/training_steps"] == 8 and sha256_dir(tmp_path / "out") == first
    last = _run(input_dir, corpus, tmp_path / "last", cfg=cfg.model_copy(update={"restore_best": False}))
    assert last["metrics"]["forge/val_loss"] == last["report"]["validations"][1][1] != m["forge/val_loss"]


def test_a_bitnet_model_trains_quantization_aware_and_stays_ternary(corpus, tmp_path):
    """Phase 4's export (absmean and thresholded layers) loads as the same BitLinear model, is
    trained through the STE and exported again with exactly ternary weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phases.bitnet.quant import BitLinear, replace_linears, ternary_codes
    from phases.bitnet.train import export_hf, load_trainable

    src = tiny_model_dir(corpus, tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    names = replace_linears(model, thresholds={"model.layers.0.mlp.up_proj": 0.7})
    export_hf(model, tokenizer, tmp_path / "bitnet",
              {"layers": names, "thresholds": {"model.layers.0.mlp.up_proj": 0.7}})
    loaded, _, info = load_trainable(tmp_path / "bitnet", corpus.tokenizer.vocab_size, "forge")
    assert sum(isinstance(m, BitLinear) for m in loaded.modules()) == len(names)
    for name in names:  # the same codes; the same scale up to float rounding (absmean's 1 / (1 / gamma))
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(ternary_codes(a.weight, a.threshold)[0], ternary_codes(b.weight, b.threshold)[0]), name
        assert torch.allclose(a.quantized_weight(), b.quantized_weight(), rtol=1e-6, atol=0), name
    x = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=x).logits, model.eval()(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)
    out = train_forge(tmp_path / "bitnet", CFG, corpus, seed=0, work_dir=tmp_path / "work", out_dir=tmp_path / "out")
    assert out["metrics"]["forge/quantization_aware"] == 1
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.config.bitnet["layers"] == names
    changed = 0
    for name in names:
        w = trained.get_submodule(name).weight
        assert torch.unique(w.abs()).numel() <= 2, name
        changed += not torch.equal(w, model.get_submodule(name).quantized_weight())
    assert changed, "training moved the ternary weights"
    assert math.isfinite(out["metrics"]["forge/val_loss"])


def test_training_on_data_files_streams_them_through_the_token_cache(input_dir, corpus, tmp_path):
    """``forge.data.files``: text from a JSONL and a Parquet file, quality-filtered, 10% held out
    by content hash; the run reports the filter's counts and validates on the files' split."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = ["model", "token", "layer", "weight", "gradient", "batch", "loss", "train"]
    docs = [" ".join(rng.choice(words, size=40)) + "." for _ in range(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:30] + ["$$$$ %%%% ####"]))
    pq.write_table(pa.table({"text": docs[30:] + docs[:2]}), tmp_path / "b.parquet")  # two duplicates
    cfg = CFG.model_copy(update={"data": CFG.data.model_copy(update={
        "files": (str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"))})})
    out = _run(input_dir, corpus, tmp_path, cfg=cfg)
    stats = out["report"]["data"]
    assert stats["documents"]["read"] == 63 and stats["documents"]["kept"] == 60
    assert stats["documents"]["rejected"]["duplicate"] == 2 and sum(stats["documents"]["rejected"].values()) == 3
    assert 0 < stats["documents"]["valid"] < 15
    assert out["metrics"]["forge/val_loss"] < out["metrics"]["forge/val_loss_input"]


def test_bad_inputs_are_typed_errors(corpus, tmp_path):
    """Not an HF dir: ArtifactError; a model whose vocabulary is smaller than the data's: PhaseError
    naming the phase; nothing is written either way."""
    from coordinator.errors import ArtifactError, PhaseError
    from phases.cognate.train import save_model_dir

    with pytest.raises(ArtifactError, match="not an HF model directory"):
        train_forge(tmp_path, CFG, corpus, seed=0, work_dir=tmp_path / "w1", out_dir=tmp_path / "o1")
    save_model_dir(tiny_cognate(vocab_size=100), corpus.tokenizer, tmp_path / "small")
    with pytest.raises(PhaseError, match="forge.*does not hold the data tokenizer's 258"):
        train_forge(tmp_path / "small", CFG, corpus, seed=0, work_dir=tmp_path / "w2", out_dir=tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
