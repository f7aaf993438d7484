"""Phase 5's user training data: the files a user names in the phase config
(``forge.data.files``), streamed through the readers and the quality filter (``sources.py``),
become two flat token files on disk:

- The validation split is fixed, by content hash (the rule of ``phases.data.corpus``): a
  document is held out when the first 8 bytes of sha256(text), as a fraction of 2**64, fall
  below ``validation_fraction``; file order and the seed do not matter. Exact duplicates are
  dropped.
- The cache (:func:`build_token_cache`) is ``train.bin`` / ``valid.bin`` of raw little-endian
  token ids (uint16, or uint32 for vocabularies over 65535), each document followed by
  <|endoftext|>, read back as read-only memmaps, so corpora larger than RAM work; ``meta.json``
  is written last and is the commit point. Its key hashes the sources, tokenizer and settings,
  so an unchanged cache is reused and a changed input rebuilds it.
- ``TokenCache.batch(step, ...)`` is a pure function of ``(seed, step, split)``, drawn exactly
  as ``Corpus.batch`` draws text rows, so training resumes from any step without RNG state.

Hand-written rather than HF ``datasets``: that would need a download-free install, and it
pickles its cache fingerprints (this project never unpickles). The flat memmap cache is the
one nanoGPT (``prepare.py``) and Megatron-LM (indexed datasets) use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from coordinator.errors import ArtifactError, ConfigError
from phases.data.corpus import _heldout_hash
from phases.data.tokenizer import Tokenizer
from phases.forge.sources import (FILES_KEY, FORMATS, REJECT_REASONS, QualityFilter, dedup_key, files_error,
                                  iter_documents, reject_reason)
from serialization.checkpoint import (
    atomic_open,
    atomic_write_json,
    read_json,
    sha256_file,
    verify,
)

__all__ = ["TokenCache", "build_token_cache", "load_token_cache"]

CACHE_FORMAT = "agentforge-forge-token-cache"
CACHE_VERSION = 1
_SPLITS = {"train": 1, "valid": 2}  # SeedSequence codes; 1 and 2 as Corpus's "train"/"heldout"


# --- the token cache -------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TokenCache:
    """An on-disk train/valid token cache. Build it with :func:`build_token_cache` or open it
    with :func:`load_token_cache`."""

    cache_dir: Path
    dtype: str  # "uint16" or "uint32", little-endian
    train_tokens: int
    valid_tokens: int
    stats: dict[str, Any]  # the meta.json contents
    reused: bool  # True when an existing cache was verified and used as is
    fingerprint: str  # the cache key: sha256 over sources, tokenizer and settings

    def ids(self, split: str) -> np.memmap:
        """The read-only id stream of ``"train"`` or ``"valid"`` (N,), memory-mapped."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        return np.memmap(self.cache_dir / f"{split}.bin", dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r")

    def _checked_ids(self, split: str, seq_len: int) -> np.memmap:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        ids = self.ids(split)
        if ids.shape[0] < seq_len + 2:
            raise ConfigError(
                f"the {split} split of the training files has {ids.shape[0]} tokens, too few for windows of "
                f"{seq_len}+1", [("seq_len", f"must be < {ids.shape[0] - 1} for the {split} split"),
                                 (FILES_KEY, f"{split} split too small ({ids.shape[0]} tokens); add documents")])
        return ids

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train") -> torch.Tensor:
        """Random windows of ``seq_len + 1`` ids (inputs ``[:, :-1]``, targets ``[:, 1:]``).

        A pure function of its arguments; each row has its own child stream of
        ``SeedSequence([seed, step, split code])``, drawn as ``Corpus.batch`` draws text rows.

        Returns:
            LongTensor (B, T + 1).
        Raises:
            ValueError: negative step/seed, batch size < 1, or a bad split.
            ConfigError: the split is shorter than ``seq_len + 2`` tokens (names the split).
        """
        if step < 0 or seed < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0, seed >= 0, batch_size >= 1; got {step}, {seed}, {batch_size}")
        ids = self._checked_ids(split, seq_len)
        seq = np.random.SeedSequence([int(seed), int(step), _SPLITS[split]])
        rows = []
        for child in seq.spawn(batch_size):  # one independent stream per row
            start = int(np.random.default_rng(child).integers(0, ids.shape[0] - seq_len))
            rows.append(ids[start:start + seq_len + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)

    def windows(self, split: str = "valid", seq_len: int | None = None,
                max_windows: int | None = None) -> torch.Tensor:
        """Fixed non-overlapping windows ``ids[i*T : i*T + T + 1]``, in order (as ``Corpus.windows``).

        Args:
            split: ``"valid"`` (default) or ``"train"``.
            seq_len: T (required: a cache has no default window length).
            max_windows: cap on W.
        Returns:
            LongTensor (W, T + 1).
        """
        if seq_len is None:
            raise ValueError("seq_len is required")
        ids = self._checked_ids(split, seq_len)
        count = (ids.shape[0] - 1) // seq_len
        if max_windows is not None:
            count = min(count, max_windows)
        flat = np.asarray(ids[:count * seq_len + 1], dtype=np.int64)
        return torch.from_numpy(np.stack([flat[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]))


def _open_cache(cache_dir: Path, meta: dict, reused: bool) -> TokenCache:
    """Check meta.json's shape and the .bin files' sizes and sha256s. Raises ArtifactError."""
    meta_path = cache_dir / "meta.json"
    try:
        if meta["format"] != CACHE_FORMAT or meta["version"] != CACHE_VERSION:
            raise ArtifactError(str(meta_path), f"not a version-{CACHE_VERSION} token cache")
        dtype, tokens, shas = meta["dtype"], meta["tokens"], meta["sha256"]
        if dtype not in ("uint16", "uint32"):
            raise ArtifactError(str(meta_path), f"unknown dtype {dtype!r}")
        for split in _SPLITS:
            path = cache_dir / f"{split}.bin"
            if not path.is_file() or path.stat().st_size != int(tokens[split]) * np.dtype(dtype).itemsize:
                raise ArtifactError(str(path), f"missing or not {tokens[split]} {dtype} tokens long")
            verify(path, shas[f"{split}.bin"])
        return TokenCache(cache_dir, dtype, int(tokens["train"]), int(tokens["valid"]), meta, reused, meta["key"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(str(meta_path), f"malformed token-cache metadata ({err!r})") from None


def load_token_cache(cache_dir: str | Path) -> TokenCache:
    """Open an existing cache, verifying every file against meta.json.

    Raises:
        ArtifactError: meta.json or a .bin file is missing, malformed or altered.
    """
    cache_dir = Path(cache_dir)
    meta = read_json(cache_dir / "meta.json")
    if not isinstance(meta, dict):
        raise ArtifactError(str(cache_dir / "meta.json"), "malformed token-cache metadata (not an object)")
    return _open_cache(cache_dir, meta, reused=True)


class _SplitWriter:
    """Appends uint arrays to one open .bin file, hashing and counting as it goes."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.tokens, self.docs = f, hashlib.sha256(), 0, 0
        self.pending: list[np.ndarray] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.docs += 1
        self.tokens += ids.shape[0]

    def flush(self) -> None:
        if self.pending:
            data = np.concatenate(self.pending).tobytes()
            self.f.write(data)
            self.sha.update(data)
            self.pending = []


def _cache_key(paths: Sequence[Path], tokenizer: Tokenizer, text_field: str, validation_fraction: float,
               quality: QualityFilter) -> tuple[str, list[dict[str, str]]]:
    sources = []
    for path in paths:
        if not path.is_file():
            raise files_error(f"training file not found: {path}")
        sources.append({"name": path.name, "sha256": sha256_file(path)})
    blob = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "sources": sources,
                       "text_field": text_field, "tokenizer": tokenizer.sha256,
                       "validation_fraction": repr(float(validation_fraction)),
                       "quality": quality.model_dump_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest(), sources


def build_token_cache(paths: Sequence[str | Path], tokenizer: Tokenizer, cache_dir: str | Path, *,
                      text_field: str = "text", validation_fraction: float = 0.1,
                      quality: QualityFilter = QualityFilter(), chunk_rows: int = 1024) -> TokenCache:
    """Stream, filter, split and tokenise the files into ``cache_dir`` (or reuse a matching cache).

    Args:
        paths: training files, read in order (each ends with one of :data:`FORMATS`).
        tokenizer: its ``sha256`` is part of the cache key; ``eos_id`` ends every document.
        cache_dir: created if missing; an existing cache with another key is overwritten.
        text_field: the field, column or dataset holding the text.
        validation_fraction: share of documents held out by content hash, in (0, 1).
        quality: the filter; its settings are part of the cache key.
        chunk_rows: documents read and tokenised at a time.
    Returns:
        The cache; ``reused`` is True when a verified cache with the same key was already there.
    Raises:
        ConfigError: key ``forge.data.files``: unreadable files, no document kept, or a split
            with fewer than 2 tokens (the message says which and what to change).
        ArtifactError: the cache directory cannot be written.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise files_error("no training files given")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    for path in paths:
        if path.suffix.lower() not in FORMATS:
            raise files_error(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                              f"supported: {', '.join(FORMATS)}")
    cache_dir = Path(cache_dir)
    key, sources = _cache_key(paths, tokenizer, text_field, validation_fraction, quality)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        with contextlib.suppress(ArtifactError):
            old = read_json(meta_path)
            if isinstance(old, dict) and old.get("key") == key:
                return _open_cache(cache_dir, old, reused=True)

    dtype = "uint16" if tokenizer.vocab_size <= 65535 else "uint32"
    np_dtype = np.dtype(dtype).newbyteorder("<")
    counts = {"read": 0, "kept": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0)}
    seen: set[bytes] = set()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(cache_dir / "train.bin") as ftrain, atomic_open(cache_dir / "valid.bin") as fvalid:
        writers = {"train": _SplitWriter(ftrain), "valid": _SplitWriter(fvalid)}
        last: tuple[str, np.ndarray] | None = None  # held back: it may move to an empty split
        pending: list[tuple[str, str]] = []  # (text, split)

        def tokenise() -> None:
            nonlocal last
            for (_, split), ids in zip(pending, tokenizer.encode_batch([t for t, _ in pending])):
                if last is not None:
                    writers[last[0]].add(last[1])
                last = (split, np.array(ids + [tokenizer.eos_id], dtype=np_dtype))
            pending.clear()
            for w in writers.values():
                w.flush()

        for path in paths:
            for doc in iter_documents(path, text_field=text_field, chunk_rows=chunk_rows):
                counts["read"] += 1
                reason = reject_reason(doc, quality)
                if reason is None and quality.enabled and quality.dedup:
                    digest = dedup_key(doc)
                    reason = "duplicate" if digest in seen else None
                    seen.add(digest)
                if reason is not None:
                    counts["rejected"][reason] += 1
                    continue
                counts["kept"] += 1
                pending.append((doc, "valid" if _heldout_hash(doc) < validation_fraction else "train"))
                if len(pending) >= chunk_rows:
                    tokenise()
        tokenise()
        if last is not None:
            split = last[0]
            other = "train" if split == "valid" else "valid"
            if writers[split].docs >= 1 and writers[other].docs == 0:  # as split_documents' fallback
                split = other
            writers[split].add(last[1])
            writers[split].flush()
        _check_result(paths, counts, writers)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta_path)  # the old cache stops being valid before its files are replaced
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "dtype": dtype,
            "tokens": {s: w.tokens for s, w in writers.items()},
            "documents": {**counts, "train": writers["train"].docs, "valid": writers["valid"].docs},
            "sha256": {f"{s}.bin": w.sha.hexdigest() for s, w in writers.items()},
            "sources": sources, "text_field": text_field, "validation_fraction": validation_fraction,
            "quality": quality.model_dump(), "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    atomic_write_json(meta_path, meta)  # the commit point
    return TokenCache(cache_dir, dtype, meta["tokens"]["train"], meta["tokens"]["valid"], meta, False, key)


def _check_result(paths: Sequence[Path], counts: dict, writers: dict[str, _SplitWriter]) -> None:
    """Raise ConfigError when nothing was kept or a split is shorter than 2 tokens."""
    names = ", ".join(str(p) for p in paths)
    if counts["read"] == 0:
        raise files_error(f"the training files hold no non-empty document: {names}")
    if counts["kept"] == 0:
        why = ", ".join(f"{r}={n}" for r, n in counts["rejected"].items() if n)
        raise files_error(f"no document of {names} survived the quality filter ({counts['read']} read; "
                          f"rejected: {why}); "
                     "loosen forge.data.quality (e.g. min_chars, min_words) or set its enabled: false")
    for split, w in writers.items():
        if w.tokens < 2:
            raise files_error(f"the {split} split of {names} has {w.tokens} tokens ({w.docs} documents; "
                         f"{counts['kept']} kept in all); add more documents (at least 2 are needed) "
                         "or loosen forge.data.quality")
