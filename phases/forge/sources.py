"""Phase 5's training files: streaming readers for each format, and the quality filter.

- Readers stream (:func:`iter_documents`): memory is bounded by one chunk of rows (or one
  document of a .txt file), never the whole file. Formats: .txt (documents separated by blank
  lines), .jsonl, .parquet, Arrow IPC (.arrow/.feather, file or stream format), HDF5 (.h5/.hdf5).
  Nothing is ever unpickled.
- The quality filter (:class:`QualityFilter`) applies heuristic rules in the spirit of Gopher
  (Rae et al. 2021, "Scaling Language Models", appendix A: word counts, symbol ratio,
  duplicate-line fraction) and C4 (Raffel et al. 2020, section 2.2); ``data.py`` drops exact
  duplicates (:func:`dedup_key`).

Parsing is left to the libraries (json, pyarrow, h5py); only the streaming glue and the filter
rules are ours, since the packages that ship Gopher rules (datatrove, dolma) are whole pipelines
with heavy dependencies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field, model_validator

from coordinator.errors import ConfigError
from phases.data.config import FrozenConfig

__all__ = ["FILES_KEY", "FORMATS", "REJECT_REASONS", "QualityFilter", "dedup_key", "files_error", "iter_documents",
           "reject_reason"]

FORMATS = (".txt", ".jsonl", ".parquet", ".arrow", ".feather", ".h5", ".hdf5")
REJECT_REASONS = ("too_short", "too_long", "too_few_words", "symbols", "repeated_lines", "char_run", "duplicate")
FILES_KEY = "forge.data.files"
_PUNCTUATION = frozenset(".,;:!?'\"()-")


def files_error(message: str) -> ConfigError:
    """A ConfigError under the key ``forge.data.files``."""
    return ConfigError(message, [(FILES_KEY, message)])


# --- streaming readers -----------------------------------------------------------------------

def iter_documents(path: str | Path, *, text_field: str = "text", chunk_rows: int = 1024) -> Iterator[str]:
    """Stream the non-empty documents of one file, in file order.

    Args:
        path: a file ending with one of :data:`FORMATS`.
        text_field: the JSON field, column or HDF5 dataset holding the text (not used for .txt).
        chunk_rows: rows decoded at a time for parquet, Arrow and HDF5.
    Yields:
        Each document whose text is not empty or whitespace (.txt documents are stripped;
        other formats yield the field's text unchanged; null values are skipped).
    Raises:
        ConfigError: key ``forge.data.files``, naming the file (and line, or the columns or
            datasets present) that is missing, unsupported or malformed.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise files_error(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(FORMATS)}")
    if not path.is_file():
        raise files_error(f"training file not found: {path}")
    reader = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet, ".arrow": _iter_arrow,
              ".feather": _iter_arrow, ".h5": _iter_hdf5, ".hdf5": _iter_hdf5}[suffix]
    return reader(path, text_field, chunk_rows)


def _iter_txt(path: Path, text_field: str, chunk_rows: int) -> Iterator[str]:
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).strip()
                    lines = []
    except UnicodeDecodeError as err:
        raise files_error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if lines:
        yield "".join(lines).strip()


def _iter_jsonl(path: Path, text_field: str, chunk_rows: int) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                why = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                raise files_error(f"{path}:{lineno}: invalid JSON ({why})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                raise files_error(f"{path}:{lineno}: no {text_field!r} field (found: {keys or 'no keys'})")
            text = obj[text_field]
            if text is not None and not isinstance(text, str):
                raise files_error(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
            if text and text.strip():
                yield text


def _pyarrow(path: Path):
    try:
        import pyarrow as pa  # lazy: only the formats that need it pay for the import
    except ImportError:
        raise files_error(f"{path}: reading this format needs pyarrow (pip install pyarrow)") from None
    return pa


def _check_arrow_field(pa, path: Path, schema, text_field: str) -> None:
    if text_field not in schema.names:
        raise files_error(f"{path}: no {text_field!r} column (columns: {', '.join(schema.names) or 'none'})")
    kind = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise files_error(f"{path}: column {text_field!r} must hold strings, it holds {kind}")


def _texts(column, chunk_rows: int) -> Iterator[str]:
    """Non-empty strings of an Arrow array, converted to Python ``chunk_rows`` at a time."""
    for start in range(0, len(column), chunk_rows):
        for text in column.slice(start, chunk_rows).to_pylist():
            if text is not None and text.strip():
                yield text


def _iter_parquet(path: Path, text_field: str, chunk_rows: int) -> Iterator[str]:
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise files_error(f"{path}: not a readable parquet file ({err})") from None
    with pf:
        _check_arrow_field(pa, path, pf.schema_arrow, text_field)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=[text_field]):
            yield from _texts(batch.column(0), chunk_rows)


def _iter_arrow(path: Path, text_field: str, chunk_rows: int) -> Iterator[str]:
    pa = _pyarrow(path)
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(pa.memory_map(str(path)))
            try:
                reader = stack.enter_context(pa.ipc.open_file(source))
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # not the IPC file format: try the stream format
                source.seek(0)
                reader = stack.enter_context(pa.ipc.open_stream(source))
                batches = iter(reader)
        except (pa.ArrowException, OSError) as err:
            raise files_error(f"{path}: not an Arrow IPC file or stream ({err})") from None
        _check_arrow_field(pa, path, reader.schema, text_field)
        index = reader.schema.get_field_index(text_field)
        for batch in batches:
            yield from _texts(batch.column(index), chunk_rows)


def _iter_hdf5(path: Path, text_field: str, chunk_rows: int) -> Iterator[str]:
    try:
        import h5py  # optional dependency, loaded only for HDF5 files
    except ImportError:
        raise files_error(f"{path}: reading HDF5 needs h5py (pip install h5py)") from None
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise files_error(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        ds = f.get(text_field)
        if not isinstance(ds, h5py.Dataset):
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            raise files_error(f"{path}: no dataset {text_field!r} (datasets: {', '.join(names) or 'none'})")
        if ds.ndim != 1 or h5py.check_string_dtype(ds.dtype) is None:
            raise files_error(f"{path}: dataset {text_field!r} must be 1-D strings or bytes, "
                         f"it is {ds.ndim}-D {ds.dtype}")
        for start in range(0, ds.shape[0], chunk_rows):
            for row, value in enumerate(ds[start:start + chunk_rows], start=start):
                try:
                    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                except UnicodeDecodeError:
                    raise files_error(f"{path}: dataset {text_field!r} row {row} is not UTF-8") from None
                if text.strip():
                    yield text


# --- quality filter --------------------------------------------------------------------------

class QualityFilter(FrozenConfig):
    """Heuristic document filter. The rules and defaults follow Gopher (Rae et al. 2021,
    appendix A.1.1) and C4 (Raffel et al. 2020); rules run in field order, the first failure
    names the rejection."""

    enabled: bool = True  # False: keep every non-empty document (no rule, no dedup)
    min_chars: int = Field(20, ge=0)  # "too_short": fewer characters
    max_chars: int = Field(100_000, ge=1)  # "too_long": more characters
    min_words: int = Field(3, ge=0)  # "too_few_words": fewer whitespace-separated words
    # "symbols": characters neither alphanumeric, whitespace nor .,;:!?'"()- over all characters
    max_symbol_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # "repeated_lines": non-blank lines that repeat an earlier line, over non-blank lines
    max_repeated_line_fraction: float = Field(0.3, ge=0.0, le=1.0)
    max_char_run: int = Field(50, ge=1)  # "char_run": a longer run of one repeated character
    # "duplicate": a document whose NFC-normalised, whitespace-collapsed text was already kept
    dedup: bool = True

    @model_validator(mode="after")
    def _check_range(self) -> QualityFilter:
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        return self


def reject_reason(doc: str, f: QualityFilter) -> str | None:
    """The first quality rule ``doc`` fails, or None when it is kept (dedup is not checked here).

    Returns:
        None, or one of "too_short", "too_long", "too_few_words", "symbols", "repeated_lines",
        "char_run".
    """
    if not f.enabled:
        return None
    if len(doc) < f.min_chars:
        return "too_short"
    if len(doc) > f.max_chars:
        return "too_long"
    if len(doc.split()) < f.min_words:
        return "too_few_words"
    symbols = sum(1 for c in doc if not (c.isalnum() or c.isspace() or c in _PUNCTUATION))
    if symbols > f.max_symbol_fraction * len(doc):
        return "symbols"
    lines = [line.strip() for line in doc.splitlines() if line.strip()]
    if lines and len(lines) - len(set(lines)) > f.max_repeated_line_fraction * len(lines):
        return "repeated_lines"
    if re.search(rf"(.)\1{{{f.max_char_run}}}", doc, re.DOTALL):  # a run of max_char_run + 1
        return "char_run"
    return None


def dedup_key(doc: str) -> bytes:
    # 16 bytes of sha256 per kept document: collisions are negligible and the set stays small.
    return hashlib.sha256(" ".join(unicodedata.normalize("NFC", doc).split()).encode("utf-8")).digest()[:16]
