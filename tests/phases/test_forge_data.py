"""Phase 5's training files: streaming readers, quality filter, hash split, token cache, batches."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow import feather

from coordinator.errors import ArtifactError, ConfigError
from phases.data import Corpus, DataConfig, TaskMix, byte_tokenizer
from phases.data.corpus import _heldout_hash
from phases.forge.data import build_token_cache, load_token_cache
from phases.forge.sources import FORMATS, QualityFilter, iter_documents, reject_reason

DOCS = [
    "The quick brown fox jumps over the lazy dog, twice.",
    "Caf\u00e9 cr\u00e8me: na\u00efve r\u00e9sum\u00e9s are written in UTF-8 here.",
    "A second line follows\nthe first line of this document.",
    "Tokenisers split text into pieces; models predict the next one.",
    "Streaming readers keep memory bounded by one chunk of rows.",
]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _problem_keys(err: ConfigError) -> list[str]:
    return [k for k, _ in err.problems]


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def _random_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))).capitalize() + f" (number {i})."
            for i in range(n)]


def _split_docs(cache, split: str, tok) -> list[str]:
    """Documents of one split, decoded back from the id stream (byte tokenizer)."""
    ids = np.asarray(cache.ids(split))
    cuts = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [bytes(ids[s:e].astype(np.uint8)).decode("utf-8") for s, e in zip(starts, cuts)]


# --- readers ---------------------------------------------------------------------------------

def _write_all_formats(tmp_path, docs):
    """Every format, with empty/whitespace/null rows that must be skipped."""
    noisy = docs[:2] + ["", "   "] + docs[2:]
    files = {}
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n\n  \n\n", encoding="utf-8")
    files["txt"] = tmp_path / "d.txt"
    files["jsonl"] = _jsonl(tmp_path / "d.jsonl", noisy)
    table = pa.table({"id": list(range(len(noisy) + 1)), "text": noisy + [None]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    files["parquet"] = tmp_path / "d.parquet"
    with pa.ipc.new_file(tmp_path / "file.arrow", table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
            w.write_batch(batch)
    files["arrow_file"] = tmp_path / "file.arrow"
    with pa.ipc.new_stream(tmp_path / "stream.arrow", table.schema) as w:
        for batch in table.to_batches(max_chunksize=3):
            w.write_batch(batch)
    files["arrow_stream"] = tmp_path / "stream.arrow"
    feather.write_feather(table, tmp_path / "d.feather")
    files["feather"] = tmp_path / "d.feather"
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("text", data=noisy, dtype=h5py.string_dtype())
    files["hdf5_str"] = tmp_path / "s.h5"
    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        f.create_dataset("text", data=np.array([d.encode("utf-8") for d in noisy], dtype=object),
                         dtype=h5py.vlen_dtype(bytes))
    files["hdf5_vlen_bytes"] = tmp_path / "b.hdf5"
    with h5py.File(tmp_path / "fixed.h5", "w") as f:
        f.create_dataset("text", data=np.array([d.encode("utf-8") for d in noisy]))  # fixed-length 'S'
    files["hdf5_fixed_bytes"] = tmp_path / "fixed.h5"
    return files


def test_every_format_yields_the_same_documents_in_order(tmp_path):
    files = _write_all_formats(tmp_path, DOCS)
    assert {p.suffix for p in files.values()} == set(FORMATS)
    for name, path in files.items():
        for chunk_rows in (1, 2, 1024):
            assert list(iter_documents(path, chunk_rows=chunk_rows)) == DOCS, (name, chunk_rows)


def test_text_field_selects_another_field(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", DOCS, field="content")
    assert list(iter_documents(path, text_field="content")) == DOCS


def test_parquet_is_read_one_batch_at_a_time(tmp_path, monkeypatch):
    docs = _random_docs(40)
    pq.write_table(pa.table({"text": docs}), tmp_path / "big.parquet", row_group_size=10)
    pulled = []
    original = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        assert kwargs["batch_size"] == 4 and kwargs["columns"] == ["text"]
        for batch in original(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    gen = iter_documents(tmp_path / "big.parquet", chunk_rows=4)
    assert pulled == []  # nothing is read before the first document is asked for
    assert next(gen) == docs[0]
    assert pulled == [4]
    assert list(gen) == docs[1:]
    assert sum(pulled) == 40 and max(pulled) == 4


def test_jsonl_streams_line_by_line(tmp_path):
    path = tmp_path / "late_error.jsonl"
    path.write_text(json.dumps({"text": DOCS[0]}) + "\n" + json.dumps({"text": DOCS[1]}) + "\n{broken\n")
    gen = iter_documents(path)
    assert next(gen) == DOCS[0] and next(gen) == DOCS[1]  # a whole-file parse would fail here
    with pytest.raises(ConfigError, match=r"late_error\.jsonl:3: invalid JSON"):
        next(gen)


def test_bad_inputs_are_config_errors_naming_the_file(tmp_path, monkeypatch):
    cases = []
    cases.append((tmp_path / "absent.jsonl", "not found"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    cases.append((tmp_path / "x.csv", ".parquet, .arrow, .feather, .h5, .hdf5"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine document here"}) + "\n\n[1, 2\n")
    cases.append((tmp_path / "bad.jsonl", "bad.jsonl:3: invalid JSON"))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    cases.append((tmp_path / "nofield.jsonl", "nofield.jsonl:1: no 'text' field (found: body, title)"))
    (tmp_path / "int.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    cases.append((tmp_path / "int.jsonl", "int.jsonl:1: field 'text' must be a string"))
    pq.write_table(pa.table({"body": ["a"], "lang": ["en"]}), tmp_path / "nocol.parquet")
    cases.append((tmp_path / "nocol.parquet", "no 'text' column (columns: body, lang)"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    cases.append((tmp_path / "ints.parquet", "must hold strings"))
    feather.write_feather(pa.table({"body": ["a"]}), tmp_path / "nocol.feather")
    cases.append((tmp_path / "nocol.feather", "no 'text' column (columns: body)"))
    (tmp_path / "junk.arrow").write_bytes(b"definitely not arrow")
    cases.append((tmp_path / "junk.arrow", "not an Arrow IPC file or stream"))
    with h5py.File(tmp_path / "nods.h5", "w") as f:
        f.create_dataset("grp/body", data=["a"], dtype=h5py.string_dtype())
    cases.append((tmp_path / "nods.h5", "no dataset 'text' (datasets: grp/body)"))
    with h5py.File(tmp_path / "floats.h5", "w") as f:
        f.create_dataset("text", data=np.zeros(3))
    cases.append((tmp_path / "floats.h5", "must be 1-D strings or bytes"))
    for path, needle in cases:
        with pytest.raises(ConfigError) as info:
            list(iter_documents(path))
        assert needle in str(info.value) and str(path.name) in str(info.value), (path, str(info.value))
        assert _problem_keys(info.value) == ["forge.data.files"]
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(ConfigError, match="pip install h5py"):
        list(iter_documents(tmp_path / "nods.h5"))


# --- quality filter --------------------------------------------------------------------------

CLEAN = ("Python's standard library is very extensive, offering a wide range of facilities. "
         "The library contains built-in modules (written in C) that provide access to system functionality.")


def test_each_quality_rule_rejects_what_it_should():
    q = QualityFilter()
    assert reject_reason(CLEAN, q) is None
    assert reject_reason("hi there you", q) == "too_short"
    assert reject_reason("word " * 30_000, q) == "too_long"
    assert reject_reason("Supercalifragilisticexpialidocious", q) == "too_few_words"
    assert reject_reason("#### $$$$ %%%% @@@@ &&&& **** ~~~~ the end of it", q) == "symbols"
    assert reject_reason("same line here\n" * 4 + "another line, different.", q) == "repeated_lines"
    assert reject_reason("Hello world, " + "a" * 51 + " is the end.", q) == "char_run"
    assert reject_reason("Hello world, " + "a" * 50 + " is the end.", q) is None  # a run of 50 is allowed
    # punctuation from .,;:!?'"()- does not count as symbols
    assert reject_reason('Well... "yes" (maybe); no -- ok!? Fine, then: go... "now"!', q) is None
    assert reject_reason("hi", QualityFilter(enabled=False)) is None
    assert reject_reason("hi there you", QualityFilter(min_chars=5)) is None


def test_quality_config_is_validated():
    with pytest.raises(ConfigError) as info:
        QualityFilter(max_symbol_fraction=1.5)
    assert _problem_keys(info.value) == ["max_symbol_fraction"]
    with pytest.raises(ConfigError, match="max_chars"):
        QualityFilter(min_chars=10, max_chars=5)
    with pytest.raises(ConfigError, match="unknown key"):
        QualityFilter(min_char=3)


def test_cache_counts_rejections_and_drops_duplicates(tmp_path, tok):
    docs = [CLEAN, "Caf\u00e9 au lait is good in the morning.", "hi there",
            "Cafe\u0301 au  lait is good\nin the morning.",  # NFD + other whitespace: a duplicate
            CLEAN, "x" * 80 + " y z", DOCS[0]]
    cache = build_token_cache([_jsonl(tmp_path / "q.jsonl", docs)], tok, tmp_path / "cache")
    d = cache.stats["documents"]
    assert (d["read"], d["kept"], d["train"] + d["valid"]) == (7, 3, 3)
    assert d["rejected"] == {"too_short": 1, "too_long": 0, "too_few_words": 0, "symbols": 0,
                             "repeated_lines": 0, "char_run": 1, "duplicate": 2}
    kept = _split_docs(cache, "train", tok) + _split_docs(cache, "valid", tok)
    assert sorted(kept) == sorted([CLEAN, docs[1], DOCS[0]])
    off = build_token_cache([tmp_path / "q.jsonl"], tok, tmp_path / "cache", quality=QualityFilter(dedup=False))
    assert off.stats["documents"]["kept"] == 5 and off.stats["documents"]["rejected"]["duplicate"] == 0


# --- split and cache -------------------------------------------------------------------------

def test_split_is_by_content_hash_and_about_ten_percent(tmp_path, tok):
    docs = _random_docs(500)
    forward = build_token_cache([_jsonl(tmp_path / "a.jsonl", docs[:250]), _jsonl(tmp_path / "b.jsonl", docs[250:])],
                                tok, tmp_path / "fwd")
    backward = build_token_cache([_jsonl(tmp_path / "r.jsonl", docs[::-1])], tok, tmp_path / "bwd")
    expected = {d for d in docs if _heldout_hash(d) < 0.1}
    assert set(_split_docs(forward, "valid", tok)) == expected == set(_split_docs(backward, "valid", tok))
    assert _split_docs(forward, "train", tok) == [d for d in docs if d not in expected]  # file order kept
    n_valid = forward.stats["documents"]["valid"]
    assert 25 <= n_valid <= 75 and n_valid == len(expected)
    assert forward.train_tokens + forward.valid_tokens == sum(len(d.encode()) + 1 for d in docs)
    assert forward.fingerprint != backward.fingerprint
    # same inputs in another directory: byte-identical files
    again = build_token_cache([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tok, tmp_path / "fwd2")
    assert again.stats["sha256"] == forward.stats["sha256"] and not again.reused


def test_empty_validation_side_gets_the_last_document(tmp_path, tok):
    docs = [d for d in _random_docs(60) if _heldout_hash(d) >= 0.1][:3]
    cache = build_token_cache([_jsonl(tmp_path / "few.jsonl", docs)], tok, tmp_path / "c")
    assert _split_docs(cache, "train", tok) == docs[:2] and _split_docs(cache, "valid", tok) == docs[2:]


def test_cache_is_reused_and_rebuilt_when_inputs_change(tmp_path, tok):
    src = _jsonl(tmp_path / "s.jsonl", _random_docs(50))
    first = build_token_cache([src], tok, tmp_path / "c")
    meta = tmp_path / "c" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    second = build_token_cache([src], tok, tmp_path / "c")
    assert (first.reused, second.reused) == (False, True)
    assert meta.stat().st_mtime_ns == stamp and second.fingerprint == first.fingerprint
    assert second.stats == first.stats

    stricter = build_token_cache([src], tok, tmp_path / "c", quality=QualityFilter(min_words=15))
    assert not stricter.reused and stricter.fingerprint != first.fingerprint
    assert stricter.stats["documents"]["rejected"]["too_few_words"] > 0
    assert load_token_cache(tmp_path / "c").fingerprint == stricter.fingerprint

    _jsonl(src, _random_docs(51))
    changed = build_token_cache([src], tok, tmp_path / "c")
    assert not changed.reused and changed.fingerprint not in (first.fingerprint, stricter.fingerprint)
    assert changed.stats["documents"]["read"] == 51


def test_corrupted_bin_is_detected_and_rebuilt(tmp_path, tok):
    src = _jsonl(tmp_path / "s.jsonl", _random_docs(50))
    built = build_token_cache([src], tok, tmp_path / "c")
    assert load_token_cache(tmp_path / "c").stats == built.stats
    train = tmp_path / "c" / "train.bin"
    data = bytearray(train.read_bytes())
    data[10] ^= 1
    train.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_token_cache(tmp_path / "c")
    rebuilt = build_token_cache([src], tok, tmp_path / "c")
    assert not rebuilt.reused and rebuilt.stats["sha256"] == built.stats["sha256"]
    assert load_token_cache(tmp_path / "c").train_tokens == built.train_tokens
    (tmp_path / "c" / "valid.bin").unlink()
    with pytest.raises(ArtifactError):
        load_token_cache(tmp_path / "c")
    with pytest.raises(ArtifactError):
        load_token_cache(tmp_path / "nowhere")


def test_bad_inputs_to_the_builder(tmp_path, tok):
    src = _jsonl(tmp_path / "s.jsonl", _random_docs(10))
    for paths, needle in [([tmp_path / "missing.txt"], "not found"), ([src, tmp_path / "x.csv"], "unsupported"),
                          ([_jsonl(tmp_path / "short.jsonl", ["a b", "tiny doc", "hi"])], "survived the quality"),
                          ([_jsonl(tmp_path / "one.jsonl", [CLEAN])], "split"), ([], "no training files")]:
        with pytest.raises(ConfigError) as info:
            build_token_cache(paths, tok, tmp_path / "c")
        assert needle in str(info.value) and _problem_keys(info.value) == ["forge.data.files"], str(info.value)
    assert not (tmp_path / "c" / "meta.json").exists()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # temp files cleaned up
    with pytest.raises(ConfigError, match=r"the (train|valid) split .* add more documents"):
        build_token_cache([tmp_path / "one.jsonl"], tok, tmp_path / "c")


# --- batches ---------------------------------------------------------------------------------

def test_batches_are_pure_and_real_windows(tmp_path, tok):
    cache = build_token_cache([_jsonl(tmp_path / "s.jsonl", _random_docs(200))], tok, tmp_path / "c")
    assert cache.dtype == "uint16" and cache.ids("train").dtype == np.uint16
    assert isinstance(cache.ids("train"), np.memmap) and not cache.ids("train").flags.writeable
    b0 = cache.batch(3, 4, 32, seed=7)
    assert b0.dtype == torch.long and b0.shape == (4, 33)
    assert torch.equal(b0, load_token_cache(tmp_path / "c").batch(3, 4, 32, seed=7))
    assert not torch.equal(b0, cache.batch(4, 4, 32, seed=7))
    assert not torch.equal(b0, cache.batch(3, 4, 32, seed=8))
    assert not torch.equal(cache.batch(3, 4, 32, seed=7, split="valid")[:, :8], b0[:, :8])
    stream = np.asarray(cache.ids("train"), dtype=np.int64)
    for row in b0.numpy():
        starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, 33).__eq__(row).all(axis=1))
        assert starts.size >= 1
    # drawn exactly as Corpus.batch draws text rows from the same streams
    corpus = Corpus(DataConfig(seq_len=32), 0, tok, torch.from_numpy(stream),
                    torch.from_numpy(np.asarray(cache.ids("valid"), dtype=np.int64)), (), "test")
    text_only = TaskMix(text=1.0, arithmetic=0.0, modular=0.0, tool=0.0)
    assert torch.equal(corpus.batch(3, 4, 32, 7, mix=text_only), b0)
    assert torch.equal(corpus.batch(5, 2, 16, 1, split="heldout"), cache.batch(5, 2, 16, 1, split="valid"))
    w = cache.windows("valid", 16, max_windows=3)
    assert torch.equal(w, corpus.windows("heldout", 16, 3))
    valid = np.asarray(cache.ids("valid"), dtype=np.int64)
    assert w.shape == (3, 17) and np.array_equal(w.numpy()[1], valid[16:33])
    with pytest.raises(ConfigError, match="valid split") as info:
        cache.batch(0, 1, cache.valid_tokens, seed=0, split="valid")
    assert "forge.data.files" in _problem_keys(info.value)
    with pytest.raises(ValueError, match="split"):
        cache.batch(0, 1, 8, seed=0, split="heldout")
