"""The data layer: corpus split, pure batches, tokenizers, generated tasks, evaluation helpers."""

from __future__ import annotations

import json
import math
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import ConfigError
from phases.data import (
    BUILTIN_TEXT,
    TASK_KINDS,
    DataConfig,
    TaskMix,
    byte_tokenizer,
    encode_task,
    evaluate_perplexity,
    heldout_task_set,
    load_corpus,
    make_task,
    read_documents,
    split_documents,
    task_accuracy,
    train_bpe,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig(seq_len=64), seed=0)


def test_builtin_corpus_is_real_text_with_a_fixed_heldout_split(corpus):
    other = load_corpus(DataConfig(seq_len=64), seed=7)  # the seed picks tasks, never the split
    assert torch.equal(corpus.train_ids, other.train_ids)
    assert torch.equal(corpus.heldout_ids, other.heldout_ids)
    share = corpus.heldout_ids.numel() / (corpus.heldout_ids.numel() + corpus.train_ids.numel())
    assert 0.02 < share < 0.10
    text = corpus.tokenizer.decode(corpus.train_ids[:2000].tolist())
    assert "the" in text.split() and "statement" in text
    train_docs, held_docs = split_documents(read_documents(BUILTIN_TEXT), 0.05)
    assert not set(train_docs) & set(held_docs)
    assert corpus.fingerprint == load_corpus(DataConfig(seq_len=64), seed=0).fingerprint


def test_batch_is_a_pure_function_of_step_and_seed(corpus):
    fresh = load_corpus(DataConfig(seq_len=64), seed=0)
    a = corpus.batch(5, 8, 64, seed=3)
    assert a.shape == (8, 65) and a.dtype == torch.long
    assert torch.equal(a, fresh.batch(5, 8, 64, seed=3))
    assert not torch.equal(a, corpus.batch(6, 8, 64, seed=3))
    assert not torch.equal(a, corpus.batch(5, 8, 64, seed=4))
    assert int(a.max()) < corpus.tokenizer.vocab_size
    held = corpus.batch(0, 4, 64, seed=3, split="heldout")
    assert not torch.equal(held, corpus.batch(0, 4, 64, seed=3))


def test_corpus_pickles_for_shipping_to_workers(corpus):
    clone = pickle.loads(pickle.dumps(corpus))
    assert clone.fingerprint == corpus.fingerprint and clone.tokenizer.sha256 == corpus.tokenizer.sha256
    mix = TaskMix(text=0.5, arithmetic=0.5, modular=0, tool=0)
    assert torch.equal(clone.batch(3, 8, 64, seed=2, mix=mix), corpus.batch(3, 8, 64, seed=2, mix=mix))


def test_text_rows_are_windows_of_the_train_stream(corpus):
    rows = corpus.batch(2, 4, 32, seed=1, mix=TaskMix(text=1, arithmetic=0, modular=0, tool=0))
    windows = corpus.train_ids.unfold(0, 33, 1)  # (N - 32, 33)
    for row in rows:
        assert bool((windows == row).all(dim=1).any())


def test_task_rows_never_contain_heldout_prompts(corpus):
    mix = TaskMix(text=0, arithmetic=1, modular=1, tool=1)
    text = "".join(corpus.tokenizer.decode(r.tolist()) for s in range(40) for r in corpus.batch(s, 8, 64, 0, mix=mix))
    assert text.count("<|endoftext|>") > 500
    for task in corpus.heldout_tasks:
        assert "<|endoftext|>" + task.prompt not in text


def _recompute(task) -> tuple[str, str]:
    """Independent parse of a task; returns (expected answer, expected suffix)."""
    if task.kind == "arithmetic":
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", task.prompt).groups()
        return str(eval(f"{a}{op}{b}")), ""
    if task.kind == "modular":
        a, op, b, m = re.fullmatch(r"\((\d+)([+*])(\d+)\) mod (\d+) = ", task.prompt).groups()
        return str(eval(f"({a}{op}{b})") % int(m)), ""
    a, word, b = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\? ", task.prompt).groups()
    op = {"plus": "+", "minus": "-", "times": "*"}[word]
    return f"<tool>calculator({a}{op}{b})</tool>", f" -> {eval(f'{a}{op}{b}')}"


def test_generated_task_answers_are_correct_and_deterministic():
    rng = np.random.default_rng(0)
    tasks = [make_task(k, rng, max_operand=999, max_modulus=97) for _ in range(300) for k in TASK_KINDS]
    for task in tasks:
        assert (task.answer, task.suffix) == _recompute(task), task
    assert [t.text for t in tasks[:30]] == [
        make_task(k, r, max_operand=999, max_modulus=97).text
        for r in [np.random.default_rng(0)] for _ in range(10) for k in TASK_KINDS]
    with pytest.raises(ValueError, match="valid kinds: arithmetic, modular, tool"):
        make_task("parity", rng, max_operand=9, max_modulus=3)


def test_heldout_task_set_is_fixed_and_distinct():
    a = heldout_task_set(0, 16, max_operand=99, max_modulus=13)
    assert a == heldout_task_set(0, 16, max_operand=99, max_modulus=13)
    assert a != heldout_task_set(1, 16, max_operand=99, max_modulus=13)
    assert len(a) == 48 and len({t.prompt for t in a}) == 48
    assert {t.kind for t in a} == set(TASK_KINDS)


def test_byte_tokenizer_ids_are_bytes():
    tok = byte_tokenizer()
    assert tok.vocab_size == 258 and tok.eos_id == 256 and tok.pad_id == 257
    assert tok.encode("Hé!") == list("Hé!".encode("utf-8"))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = byte_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_bpe_tokenizer_is_deterministic_and_round_trips(corpus):
    docs = read_documents(BUILTIN_TEXT)[:400]
    a, b = train_bpe(docs, 600), train_bpe(docs, 600)
    assert a.sha256 == b.sha256 and a.vocab_size == 600
    sample = "Assignment statements (re)bind names: x = 12*7 -> 84 ünïcode"
    assert a.decode(a.encode(sample)) == sample
    assert len(a.encode(docs[0])) < len(docs[0].encode("utf-8"))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_saves_an_hf_dir_that_autotokenizer_loads(tmp_path, kind):
    from transformers import AutoTokenizer

    tok = byte_tokenizer() if kind == "byte" else train_bpe(read_documents(BUILTIN_TEXT), 512)
    tok.save(tmp_path, model_max_length=128)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "What is 12 times 7? <tool>calculator(12*7)</tool> -> 84"
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id and hf.model_max_length == 128
    assert hf.decode(tok.encode(text)) == text


def test_user_txt_jsonl_and_parquet_files_load(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    paras = [" ".join(words[i % 12:] + words[:i % 12]) + f" paragraph {i}." for i in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(paras[:30]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(paras[30:50])))
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": paras[50:]}), tmp_path / "c.parquet")
        files.append(str(tmp_path / "c.parquet"))
    except ImportError:
        pass
    docs = read_documents(files)
    assert docs == paras[:len(docs)] and len(docs) == (60 if len(files) == 3 else 50)
    corpus = load_corpus(DataConfig(corpus=files, seq_len=16, tokenizer="bpe", vocab_size=300), seed=0)
    assert corpus.heldout_ids.numel() > 17 and corpus.batch(0, 2, 16, 0).shape == (2, 17)
    joined = corpus.tokenizer.decode(torch.cat([corpus.train_ids, corpus.heldout_ids]).tolist())
    assert all(p in joined for p in docs)


def test_bad_corpus_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ConfigError) as err:
        read_documents([bad])
    assert err.value.problems[0][0] == "corpus" and f"{bad}:2" in err.value.problems[0][1]
    with pytest.raises(ConfigError, match="not found"):
        load_corpus(DataConfig(corpus=[str(tmp_path / "missing.txt")]), seed=0)


def test_bad_data_config_values_name_the_field():
    with pytest.raises(ConfigError) as err:
        DataConfig(tokenizer="wordpiece", heldout_fraction=0.9)
    problems = dict(err.value.problems)
    assert "'byte' or 'bpe'" in problems["tokenizer"] and "(0, 0.5]" in problems["heldout_fraction"]
    with pytest.raises(ConfigError) as err:
        DataConfig.from_dict({"mix": {"txt": 1.0}}, prefix="data")
    key, msg = err.value.problems[0]
    assert key == "data.mix.txt" and "arithmetic, modular, text, tool" in msg
    with pytest.raises(ConfigError) as err:
        DataConfig(corpus=["notes.csv"])
    assert err.value.problems[0][0] == "corpus" and ".txt, .jsonl, .parquet" in err.value.problems[0][1]


class _Uniform(torch.nn.Module):
    """A 'model' whose logits are all zero: its perplexity is exactly the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + 0 * self.anchor})()


def test_perplexity_is_exact_and_independent_of_batching(corpus):
    uniform = _Uniform(corpus.tokenizer.vocab_size)
    assert evaluate_perplexity(uniform, corpus, max_batches=2) == pytest.approx(258, rel=1e-12)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(258, 258)
    model = type("M", (torch.nn.Module,), {"forward": lambda self, input_ids: type("O", (), {
        "logits": self.emb(input_ids)})()})()
    model.emb = emb
    a = evaluate_perplexity(model, corpus, batch_size=4, max_batches=4)
    b = evaluate_perplexity(model, corpus, batch_size=16, max_batches=1)
    assert a == b and math.isfinite(a)


class _Oracle(torch.nn.Module):
    """Predicts each encoded task perfectly (or with one answer token wrong for ``wrong`` kinds)."""

    def __init__(self, tok, tasks, wrong=()):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seqs = {}
        for t in tasks:
            ids, start, end = encode_task(tok, t)
            nxt = ids[1:] + [tok.eos_id]
            if t.kind in wrong:
                nxt[end - 2] = (nxt[end - 2] + 1) % 256  # corrupt the last answer token's prediction
            self.seqs[tuple(ids)] = nxt
        self.tok, self.vocab = tok, tok.vocab_size

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, row in enumerate(input_ids.tolist()):
            n = len(row)
            while row[n - 1] == self.tok.pad_id:
                n -= 1
            for p, target in enumerate(self.seqs[tuple(row[:n])]):
                logits[i, p, target] = 1.0
        return type("Out", (), {"logits": logits})()


def test_task_accuracy_scores_exact_match_of_the_answer_span(corpus):
    tasks = list(corpus.heldout_tasks[::8])
    perfect = task_accuracy(_Oracle(corpus.tokenizer, tasks), corpus.tokenizer, tasks, batch_size=5)
    assert perfect["tasks/accuracy"] == 1.0
    scores = task_accuracy(_Oracle(corpus.tokenizer, tasks, wrong=("tool",)), corpus.tokenizer, tasks)
    assert scores["tasks/accuracy/tool"] == 0.0 and scores["tasks/accuracy/arithmetic"] == 1.0
    assert scores["tasks/accuracy"] == pytest.approx(2 / 3, abs=0.05)
