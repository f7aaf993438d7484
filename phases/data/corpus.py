"""The corpus: documents -> tokenizer -> train/held-out id streams -> deterministic batches.

DESIGN.md ("Data", "Determinism"): nothing is downloaded; the builtin corpus is prose shipped
in ``phases/data/text/`` (see its NOTICE.txt); users may point at .txt/.jsonl/.parquet files.

- The held-out split is fixed: a document is held out when the first 8 bytes of the sha256
  of its text, read as a fraction of 2**64, fall below ``heldout_fraction``. It depends on
  neither the seed nor file order, and duplicate documents land on the same side.
- ``Corpus.batch(step, ...)`` is a pure function of ``(seed, step, split)`` (numpy
  ``SeedSequence([seed, step, split])``), so training resumes exactly from any step without
  saved RNG state, and every row is drawn from its own child stream.
- :func:`evaluate_perplexity` uses fixed non-overlapping windows and adds the per-window
  NLL sums with ``math.fsum`` (exactly rounded, so the total does not depend on the order
  in which windows are evaluated or gathered).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coordinator.errors import ConfigError

from .config import DataConfig, TaskMix
from .tasks import TASK_KINDS, Task, heldout_task_set, pack_tasks
from .tokenizer import Tokenizer, byte_tokenizer, train_bpe

__all__ = ["BUILTIN_TEXT", "Corpus", "load_corpus", "read_documents", "split_documents",
           "evaluate_perplexity", "mean_nll"]

BUILTIN_TEXT = (Path(__file__).resolve().parent / "text" / "python_docs.txt",)
_SPLITS = {"train": 1, "heldout": 2}


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Read documents from .txt (blank-line separated), .jsonl ("text" field) or .parquet files.

    Raises:
        ConfigError: key ``corpus``, naming the file (and line) that is missing or malformed.
    """
    docs: list[str] = []
    for path in (Path(p) for p in paths):
        if not path.is_file():
            raise ConfigError(f"corpus file not found: {path}", [("corpus", f"file not found: {path}")])
        suffix = path.suffix.lower()
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            docs.extend(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())
        elif suffix == ".jsonl":
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON ({err.msg})",
                                      [("corpus", f"{path}:{lineno}: invalid JSON ({err.msg})")]) from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ConfigError(f"{path}:{lineno}: expected an object with a string 'text' field",
                                      [("corpus", f"{path}:{lineno}: no string 'text' field")])
                if obj["text"].strip():
                    docs.append(obj["text"])
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq  # optional; comes with Ray
            except ImportError:
                raise ConfigError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)",
                                  [("corpus", f"{path}: pyarrow is not installed")]) from None
            schema = pq.read_schema(path)
            if "text" not in schema.names:
                raise ConfigError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})",
                                  [("corpus", f"{path}: no 'text' column")])
            docs.extend(t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()
                        if isinstance(t, str) and t.strip())
        else:
            raise ConfigError(f"{path}: unsupported corpus file type",
                              [("corpus", f"{path}: must end with .txt, .jsonl or .parquet")])
    if not docs:
        raise ConfigError("the corpus holds no text", [("corpus", "no non-empty document in the files")])
    return docs


def _heldout_hash(doc: str) -> float:
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Fixed split by content hash; when that leaves a side empty, the last documents are held out.

    Returns:
        (train documents, held-out documents), each in corpus order. With one document both
        lists are that document; :func:`load_corpus` then splits its tokens instead.
    """
    train = [d for d in docs if _heldout_hash(d) >= fraction]
    held = [d for d in docs if _heldout_hash(d) < fraction]
    if train and held:
        return train, held
    if len(docs) == 1:
        return list(docs), list(docs)
    k = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    return list(docs[:-k]), list(docs[-k:])


def _stream(tokenizer: Tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """Concatenate documents, each followed by <|endoftext|>, as a 1-D LongTensor."""
    parts = [np.asarray(ids + [tokenizer.eos_id], dtype=np.int64) for ids in tokenizer.encode_batch(docs)]
    return torch.from_numpy(np.concatenate(parts))


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token streams, tokenizer and task sets of one run. Build it with :func:`load_corpus`."""

    config: DataConfig
    seed: int
    tokenizer: Tokenizer
    train_ids: torch.Tensor  # (N_train,) int64
    heldout_ids: torch.Tensor  # (N_heldout,) int64
    heldout_tasks: tuple[Task, ...]
    fingerprint: str  # sha256 over tokenizer, id streams, tasks and config
    _exclude: frozenset[str] = field(repr=False, default=frozenset())

    @property
    def heldout_prompts(self) -> frozenset[str]:
        """The held-out tasks' prompts, which training streams never emit."""
        return self._exclude

    def heldout_subset(self, per_kind: int) -> list[Task]:
        """The first ``per_kind`` held-out tasks of each kind, kinds in ``TASK_KINDS`` order."""
        return [t for k in TASK_KINDS for t in [t for t in self.heldout_tasks if t.kind == k][:per_kind]]

    def _ids(self, split: str) -> torch.Tensor:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        return self.train_ids if split == "train" else self.heldout_ids

    def _check_len(self, ids: torch.Tensor, seq_len: int, split: str) -> None:
        if ids.numel() < seq_len + 2:
            raise ConfigError(
                f"the {split} split has {ids.numel()} tokens, too few for windows of {seq_len}+1",
                [("seq_len", f"must be < {ids.numel() - 1} for this corpus's {split} split"),
                 ("corpus", f"{split} split too small ({ids.numel()} tokens)")])

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, split: str = "train",
              mix: TaskMix | None = None) -> torch.Tensor:
        """Rows of ``seq_len + 1`` ids (inputs ``[:, :-1]``, targets ``[:, 1:]``).

        A pure function of its arguments: the same (step, seed) gives the same batch in any
        process. Text rows are random windows of the split; task rows (train split only) are
        packed generated tasks that never include a held-out prompt.

        Args:
            step: training step (>= 0).
            batch_size: rows B.
            seq_len: T.
            seed: data seed (>= 0).
            split: ``"train"`` or ``"heldout"`` (held-out batches are text only).
            mix: row mix; defaults to ``config.mix``.
        Returns:
            LongTensor (B, T + 1).
        Raises:
            ValueError: for a negative step/seed, a bad split or batch size.
            ConfigError: if the split is shorter than one window.
        """
        if step < 0 or seed < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0, seed >= 0, batch_size >= 1; got {step}, {seed}, {batch_size}")
        ids = self._ids(split)
        self._check_len(ids, seq_len, split)
        p_text, kinds = (mix or self.config.mix).row_probabilities()
        if split == "heldout" or not kinds:
            p_text = 1.0
        seq = np.random.SeedSequence([int(seed), int(step), _SPLITS[split]])
        is_text = np.random.default_rng(seq).random(batch_size) < p_text
        rows = []
        for r, child in enumerate(seq.spawn(batch_size)):  # one independent stream per row
            rng = np.random.default_rng(child)
            if is_text[r]:
                start = int(rng.integers(0, ids.numel() - seq_len))
                rows.append(ids[start:start + seq_len + 1])
            else:
                packed = pack_tasks(rng, self.tokenizer, seq_len + 1, kinds, max_operand=self.config.max_operand,
                                    max_modulus=self.config.max_modulus, exclude=self._exclude)
                rows.append(torch.tensor(packed, dtype=torch.long))
        return torch.stack(rows)  # (B, T+1)

    def windows(self, split: str = "heldout", seq_len: int | None = None,
                max_windows: int | None = None) -> torch.Tensor:
        """Fixed non-overlapping evaluation windows ``ids[i*T : i*T + T + 1]``, in order.

        Returns:
            LongTensor (W, T + 1); W is capped by ``max_windows`` when given.
        """
        ids = self._ids(split)
        seq_len = seq_len or self.config.seq_len
        self._check_len(ids, seq_len, split)
        count = (ids.numel() - 1) // seq_len
        if max_windows is not None:
            count = min(count, max_windows)
        return torch.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])


def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    """Read, split and tokenise the corpus and draw the held-out task set.

    Args:
        cfg: the data config.
        seed: run seed (>= 0); it selects the held-out tasks. Text and split do not depend on it.
    Returns:
        The corpus (deterministic for the same cfg and seed: see ``Corpus.fingerprint``).
    Raises:
        ConfigError: unreadable/missing files, empty corpus, or a split shorter than a window.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    docs = read_documents(BUILTIN_TEXT if cfg.corpus == "builtin" else cfg.corpus)
    train_docs, held_docs = split_documents(docs, cfg.heldout_fraction)
    tokenizer = byte_tokenizer() if cfg.tokenizer == "byte" else train_bpe(train_docs, cfg.vocab_size)
    if len(docs) == 1:
        # One document: hold out its last tokens instead of a document.
        stream = _stream(tokenizer, docs)
        cut = int(round(stream.numel() * (1.0 - cfg.heldout_fraction)))
        train_ids, heldout_ids = stream[:cut].clone(), stream[cut:].clone()
    else:
        train_ids, heldout_ids = _stream(tokenizer, train_docs), _stream(tokenizer, held_docs)
    tasks = heldout_task_set(seed, cfg.heldout_tasks, max_operand=cfg.max_operand, max_modulus=cfg.max_modulus)
    h = hashlib.sha256()
    for part in (cfg.model_dump_json(), str(seed), tokenizer.sha256):
        h.update(part.encode("utf-8"))
    h.update(train_ids.numpy().tobytes())
    h.update(heldout_ids.numpy().tobytes())
    h.update("\n".join(t.text for t in tasks).encode("utf-8"))
    corpus = Corpus(cfg, seed, tokenizer, train_ids, heldout_ids, tasks, h.hexdigest(),
                    frozenset(t.prompt for t in tasks))
    corpus._check_len(train_ids, cfg.seq_len, "train")
    corpus._check_len(heldout_ids, cfg.seq_len, "heldout")
    return corpus


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, corpus: Corpus, *, split: str = "heldout",
                        seq_len: int | None = None, batch_size: int = 8, max_batches: int | None = None) -> float:
    """Perplexity exp(sum of token NLLs / token count) over fixed windows, in eval mode.

    Args:
        model: causal LM; ``model(input_ids=x).logits`` is (B, T, V).
        corpus: supplies the windows.
        split: ``"heldout"`` (default) or ``"train"``.
        seq_len: window length (default: the data config's).
        batch_size: windows per forward pass (does not change the result beyond float noise
            inside the model; the reduction itself is exact).
        max_batches: evaluate only the first ``max_batches * batch_size`` windows.
    Returns:
        The perplexity (float).
    """
    windows = corpus.windows(split, seq_len, None if max_batches is None else max_batches * batch_size)
    return math.exp(mean_nll(model, windows, batch_size=batch_size))


@torch.no_grad()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) over fixed windows (W, T + 1), in eval mode; the per-window
    sums are added with ``math.fsum`` (exact, independent of batching and order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: list[float] = []
    try:
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i:i + batch_size].to(device)  # (B, T+1)
            logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
            nll = F.cross_entropy(logits.transpose(1, 2).double(), x[:, 1:], reduction="none")  # (B, T)
            sums.extend(nll.sum(dim=1).tolist())
    finally:
        model.train(was_training)
    return math.fsum(sums) / (windows.shape[0] * (windows.shape[1] - 1))
