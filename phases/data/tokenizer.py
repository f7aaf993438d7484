"""Offline tokenizers: byte-level, or byte-level BPE trained on the corpus with HF `tokenizers`.

Nothing is downloaded (DESIGN.md, "Data"). Both kinds are built on a ``tokenizers.Tokenizer``
with GPT-2's byte-to-unicode alphabet (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", the byte-level BPE of Sennrich et al. 2016), so any UTF-8 text encodes
without unknown tokens and decodes back exactly:

- ``byte``: a BPE model with the 256 byte symbols and no merges; id ``b`` is byte ``b``;
  two specials follow (``<|endoftext|>`` = 256, ``<|pad|>`` = 257).
- ``bpe``: ``tokenizers.trainers.BpeTrainer`` on the training documents; the specials take
  ids 0 and 1. Training is deterministic (same texts and vocab size -> same JSON; checked by
  ``tests/phases/test_data.py``).

``Tokenizer.save(dir)`` writes ``tokenizer.json`` + ``tokenizer_config.json`` through
``transformers.PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained(dir)`` loads it
in any HF tool. ``<|endoftext|>`` is the BOS, EOS and document separator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "Tokenizer", "byte_tokenizer", "train_bpe", "bytes_to_unicode"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)  # bytes without a printable glyph move above 255
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what Agent Forge needs: specials, caching, HF export.

    Args:
        backend: the HF ``tokenizers`` object (its pre-tokenizer/decoder are byte-level).
        kind: ``"byte"`` or ``"bpe"``.
    """

    def __init__(self, backend: _Backend, kind: str):
        self.backend = backend
        self.kind = kind
        self.eos_id = backend.token_to_id(EOS_TOKEN)
        self.pad_id = backend.token_to_id(PAD_TOKEN)
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        # Task strings repeat a lot (prompts, answers); caching keeps batch building cheap.
        self._encode_cached = lru_cache(maxsize=1 << 16)(self._encode_tuple)

    def __getstate__(self) -> dict:
        # Pickle (e.g. into a Ray object) as the canonical JSON; the cache is rebuilt.
        return {"json": self.backend.to_str(), "kind": self.kind}

    def __setstate__(self, state: dict) -> None:
        self.__init__(_Backend.from_str(state["json"]), state["kind"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON of the tokenizer (identifies it in fingerprints)."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def _encode_tuple(self, text: str) -> tuple[int, ...]:
        return tuple(self.backend.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS added)."""
        return list(self._encode_cached(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts at once (uses the backend's parallel batch encoder)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; byte-level decoding is exact for ids that came from ``encode``."""
        return self.backend.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    def to_hf(self, model_max_length: int | None = None):
        """A ``transformers.PreTrainedTokenizerFast`` over a copy of this tokenizer."""
        from transformers import PreTrainedTokenizerFast  # heavy import, only when exporting

        kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
        return PreTrainedTokenizerFast(
            tokenizer_object=_Backend.from_str(self.backend.to_str()),
            bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, **kwargs)

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json into an HF model directory.

        Args:
            directory: existing or new directory (created if missing).
            model_max_length: recorded as the tokenizer's maximum length when given.
        """
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.to_hf(model_max_length).save_pretrained(str(directory))


def _byte_level(backend: _Backend, use_regex: bool) -> _Backend:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer: id b is byte b (0..255), then <|endoftext|>=256, <|pad|>=257."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    # No regex split: a whole text is one "word" of byte symbols and no merges apply.
    backend = _byte_level(_Backend(models.BPE(vocab=vocab, merges=[])), use_regex=False)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend, "byte")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer offline.

    Args:
        texts: training documents (only the training split, so held-out text is unseen).
        vocab_size: target vocabulary size, specials and the 256 byte symbols included.
    Returns:
        The trained tokenizer (deterministic for the same texts and vocab_size).
    Raises:
        ValueError: if vocab_size leaves no room for the byte alphabet and specials.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    backend = _byte_level(_Backend(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, "bpe")
