"""Configuration of the data layer: corpus, tokenizer, windows and generated tasks.

Configs are data (CONVENTIONS.md, rule 3): frozen pydantic v2 models with commented defaults
and validation that names the field and its allowed values. :class:`FrozenConfig` is the
base of every config in ``phases/``: constructing one with a bad value raises
:class:`coordinator.errors.ConfigError` whose ``problems`` list every ``(key_path, message)``,
so callers never see a raw pydantic ``ValidationError``.
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from coordinator.errors import ConfigError

__all__ = ["FrozenConfig", "TaskMix", "DataConfig", "config_error"]

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names allowed at ``loc[:-1]`` below ``cls`` (for "unknown key" messages)."""
    current: Any = cls
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            current = field.annotation if field is not None else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]  # a dict key: descend into its value type
        else:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _join(parts: list) -> str:
    """Key path from location parts; "" for a problem of the whole (top-level) config."""
    return ".".join(str(p) for p in parts if str(p) != "")


def config_error(cls: type[BaseModel], err: ValidationError, prefix: str = "") -> ConfigError:
    """Turn a pydantic ``ValidationError`` into a ConfigError with one problem per error.

    Args:
        cls: the config class that was validated (used to list allowed keys).
        err: the pydantic error.
        prefix: key path prepended to every problem, e.g. ``"phases.cognate"``.
    Returns:
        A ConfigError whose ``problems`` are ``(key_path, message)`` pairs.
    """
    base = prefix.split(".") if prefix else []
    problems: list[tuple[str, str]] = []
    for e in err.errors():
        # Drop pydantic's union-branch and validator labels from the location.
        loc = [p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):
            # A nested FrozenConfig raised its own ConfigError: keep its key paths.
            problems.extend((_join(base + loc + [k]), m) for k, m in inner.problems)
            continue
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(cls, tuple(loc)) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown key{hint}; allowed keys: {', '.join(allowed)}" if allowed else "unknown key"
        else:
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if e["type"] != "missing" and f"{e.get('input')!r}" not in msg:
                msg = f"{msg} (got {e.get('input')!r})"
        problems.append((_join(base + loc), msg))
    summary = "; ".join(f"{k or '(whole config)'}: {m}" for k, m in problems)
    return ConfigError(f"invalid {cls.__name__}: {summary}", problems)


class FrozenConfig(BaseModel):
    """Frozen pydantic model that raises ConfigError (not ValidationError) on bad input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise config_error(type(self), err) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, prefix: str = "") -> "FrozenConfig":
        """Validate a mapping (e.g. a YAML section).

        Args:
            data: the raw values.
            prefix: key path of this section in the whole file, for error messages.
        Raises:
            ConfigError: naming every bad key path and the allowed values.
        """
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise config_error(cls, err, prefix) from None


def _finite_non_negative(value: float, name: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


class TaskMix(FrozenConfig):
    """Relative weights of what a training batch holds (normalised at use; need not sum to 1).

    A row of a batch is either a window of corpus text (probability text / total) or a row
    packed with generated tasks, each task's kind drawn by the three task weights.
    """

    text: float = 0.8  # windows of corpus text
    arithmetic: float = 0.1  # "12+35=47"
    modular: float = 0.05  # "(17*5) mod 7 = 1"
    tool: float = 0.05  # "What is 12 times 7? <tool>calculator(12*7)</tool> -> 84"

    @field_validator("text", "arithmetic", "modular", "tool")
    @classmethod
    def _check_weight(cls, v: float, info) -> float:
        return _finite_non_negative(v, info.field_name)

    @model_validator(mode="after")
    def _check_total(self) -> "TaskMix":
        if self.text + self.arithmetic + self.modular + self.tool <= 0:
            raise ValueError("at least one of text, arithmetic, modular, tool must be > 0")
        return self

    def row_probabilities(self) -> tuple[float, dict[str, float]]:
        """(P(text row), {task kind: P(kind | task row)}); the dict is empty with no task weight."""
        total = self.text + self.arithmetic + self.modular + self.tool
        tasks = self.arithmetic + self.modular + self.tool
        kinds = {} if tasks <= 0 else {
            "arithmetic": self.arithmetic / tasks, "modular": self.modular / tasks, "tool": self.tool / tasks}
        return self.text / total, kinds


class DataConfig(FrozenConfig):
    """Where the text comes from, how it is tokenised and cut, and which tasks are generated."""

    # "builtin": the Python-documentation prose shipped in phases/data/text/ (PSF license);
    # or a list of user files: .txt (documents split at blank lines), .jsonl (one JSON
    # object a line with a "text" field), .parquet (a "text" column; needs pyarrow).
    corpus: Literal["builtin"] | tuple[str, ...] = "builtin"
    # "byte": byte-level, vocab 256 + 2 specials, nothing to train; "bpe": byte-level BPE
    # trained offline on the training split with HF `tokenizers` (deterministic).
    tokenizer: Literal["byte", "bpe"] = "byte"
    # BPE only: the vocabulary size to train to (the byte tokenizer is always 258).
    vocab_size: int = 4096
    # Tokens per training window (a batch row holds seq_len + 1 tokens: inputs and targets).
    seq_len: int = 128
    # Fraction of documents held out for perplexity; the split hashes each document's text,
    # so it is fixed: independent of the seed, of file order and of the tokenizer.
    heldout_fraction: float = 0.05
    # Generated tasks: operands are drawn from [0, max_operand].
    max_operand: int = 99
    # Modular tasks draw the modulus from [2, max_modulus].
    max_modulus: int = 13
    # Size of the fixed held-out task set, per task kind (never used for training).
    heldout_tasks: int = 64
    # Mix for batches when the caller gives none (Cognate's shared warm-up uses its own).
    mix: TaskMix = TaskMix()

    @field_validator("corpus")
    @classmethod
    def _check_corpus(cls, v):
        if isinstance(v, str):
            return v
        if len(v) == 0:
            raise ValueError('must be "builtin" or a non-empty list of files')
        for i, path in enumerate(v):
            if not str(path).lower().endswith(CORPUS_SUFFIXES):
                raise ValueError(f"file {i} ({path!r}) must end with one of {', '.join(CORPUS_SUFFIXES)}")
        return v

    @field_validator("vocab_size")
    @classmethod
    def _check_vocab(cls, v: int) -> int:
        if not 300 <= v <= 1_000_000:
            raise ValueError(f"must be between 300 and 1000000 (256 bytes + specials + merges), got {v}")
        return v

    @field_validator("seq_len")
    @classmethod
    def _check_seq_len(cls, v: int) -> int:
        if not 8 <= v <= 1_048_576:
            raise ValueError(f"must be between 8 and 1048576, got {v}")
        return v

    @field_validator("heldout_fraction")
    @classmethod
    def _check_fraction(cls, v: float) -> float:
        if not (0.0 < v <= 0.5):
            raise ValueError(f"must be in (0, 0.5], got {v}")
        return v

    @field_validator("max_operand")
    @classmethod
    def _check_operand(cls, v: int) -> int:
        if not 9 <= v <= 10**9:
            raise ValueError(f"must be between 9 and 1000000000, got {v}")
        return v

    @field_validator("max_modulus")
    @classmethod
    def _check_modulus(cls, v: int) -> int:
        if not 2 <= v <= 10**6:
            raise ValueError(f"must be between 2 and 1000000, got {v}")
        return v

    @field_validator("heldout_tasks")
    @classmethod
    def _check_heldout_tasks(cls, v: int) -> int:
        if not 1 <= v <= 100_000:
            raise ValueError(f"must be between 1 and 100000, got {v}")
        return v
