"""Checkpoint and artifact IO: atomic writes, sha256 of files and directories, safetensors, JSON.

Every artifact in a run folder is written through here so that a crash never leaves a torn
file (write to a temp file in the same directory, flush, fsync, ``os.replace``, fsync the
directory) and every artifact has a sha256 that resume and load verify before trusting it.

Directory hash (:func:`sha256_dir`), scheme "agentforge-sha256-dir-v1". Nothing is ignored.
Entries are every file and every subdirectory below the root (not the root itself), named
by their path relative to the root with "/" separators, encoded as the file system's bytes
(``os.fsencode``), and sorted by those bytes. Symlinks are followed (a link hashes as what it
points to); a broken link, a link cycle or a special file (socket, fifo, device) is an
ArtifactError. The digest is sha256 over::

    b"agentforge-sha256-dir-v1\\0"
    then per entry, in order:
      directory: b"d" + u64le(len(path)) + path
      file:      b"f" + u64le(len(path)) + path + u64le(size) + sha256(content) (32 raw bytes)

Safetensors files (:func:`save_tensors`) are written by this module rather than by the
safetensors library, whose header orders ``__metadata__`` by a per-process hash seed (the
same tensors gave different bytes in different processes with safetensors 0.8). Layout, as
the safetensors spec: u64le header length N, N bytes of compact JSON (``__metadata__`` with
sorted keys first, then tensors in data order) padded with spaces to a multiple of 8, then
the raw little-endian C-order data; tensors are ordered by itemsize (largest first), then
name, which keeps every tensor aligned with no gaps. Files are read with the safetensors
library, after the sha256 check.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from coordinator.errors import ArtifactError

__all__ = [
    "publish_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_tensors",
    "read_json",
    "save_tensors",
    "sha256_dir",
    "sha256_file",
    "sha256_path",
    "verify",
]

_CHUNK = 1 << 20
_DIR_SCHEME = b"agentforge-sha256-dir-v1\0"
_ST_DTYPES: dict = {}


def _st_dtypes() -> dict:
    """torch dtype -> safetensors dtype code, for the codes safetensors' torch loader reads.

    Built on first use: torch is imported lazily so that hashing and JSON IO (used by agent
    actors and the CLI) do not pay torch's import time.
    """
    import torch

    if not _ST_DTYPES:
        _ST_DTYPES.update({
            torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
        })
        for name, code in [("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                           ("float8_e4m3fn", "F8_E4M3"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
                           ("float8_e5m2", "F8_E5M2"), ("float8_e5m2fnuz", "F8_E5M2FNUZ")]:
            if hasattr(torch, name):
                _ST_DTYPES[getattr(torch, name)] = code
    return _ST_DTYPES


# --- atomic writes ---------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory for fsync; replace is durable there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (certain network mounts) do not support fsync on directories.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears at ``path`` only if the block completes.

    Writes go to a temp file in the same directory (created with the umask's permissions);
    on success it is flushed, fsynced and renamed over ``path``, then the directory is
    fsynced. If the block raises, the temp file is removed and ``path`` is untouched.
    Missing parent directories are created.

    Raises:
        OSError: the file system refused; the block's own exceptions pass through.
    """
    path = Path(path)
    parent = path.parent
    created = []  # new directories' own entries must be made durable too
    ancestor = parent
    while not ancestor.exists():
        created.append(ancestor)
        ancestor = ancestor.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)
    for directory in created:
        _fsync_dir(directory.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> str:
    """Write ``data`` to ``path`` atomically and durably.

    Returns:
        The sha256 (hex) of the bytes written.
    Raises:
        ArtifactError: the file could not be written.
    """
    try:
        with atomic_open(path) as f:
            f.write(data)
    except OSError as exc:
        raise ArtifactError(str(path), f"cannot write: {exc}") from exc
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` atomically. Returns the sha256 of the encoded bytes. Raises ArtifactError."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as deterministic JSON: sorted keys, indent 2, UTF-8, trailing newline.

    NaN and infinity are refused (they are not JSON); store them as null or a string.

    Returns:
        The sha256 (hex) of the bytes written.
    Raises:
        ArtifactError: ``obj`` is not JSON-serialisable (nothing is written) or the write failed.
    """
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ArtifactError(str(path), f"cannot write JSON: {exc}") from exc
    return atomic_write_text(path, text)


def staging_dir(out: str | os.PathLike) -> Path:
    """The empty sibling ``.NAME.tmp`` of ``out`` to write a directory into before
    ``publish_dir``: its parent is created, a left-over from an interrupted write removed (the
    directory itself is not created: ``save_pretrained`` and friends create it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Make the fully written directory ``tmp`` appear as ``out`` atomically: fsync every file
    and ``tmp`` itself, move an existing ``out`` aside, rename ``tmp`` over it, drop the old one.
    A crash leaves either the old ``out`` or the new one, never a half-written directory.

    Returns:
        ``out`` as a Path.
    """
    tmp, out = Path(tmp), Path(out)
    for p in sorted(tmp.rglob("*")) + [tmp]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# --- hashing ---------------------------------------------------------------------------------

def _check_sha(expected: str) -> str:
    if not isinstance(expected, str) or len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected.lower()):
        raise ValueError(f"expected sha256 must be 64 hex digits, got {expected!r}")
    return expected.lower()


def _file_digest(path: Path) -> tuple[int, bytes]:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.digest()


def sha256_file(path: str | os.PathLike) -> str:
    """Return the sha256 (hex) of a file's contents, read in 1 MiB chunks.

    Raises:
        ArtifactError: missing, a directory, or unreadable.
    """
    try:
        return _file_digest(Path(path))[1].hex()
    except FileNotFoundError as exc:
        raise ArtifactError(str(path), "file not found") from exc
    except IsADirectoryError as exc:
        raise ArtifactError(str(path), "is a directory; use sha256_dir or sha256_path") from exc
    except OSError as exc:
        raise ArtifactError(str(path), f"cannot read: {exc}") from exc


def _dir_entries(root: Path) -> list[tuple[bytes, Path | None]]:
    """All entries below ``root``: (relative path bytes, file path or None for a directory)."""
    entries: list[tuple[bytes, Path | None]] = []

    def visit(directory: Path, prefix: str, ancestors: frozenset[str]) -> None:
        with os.scandir(directory) as it:
            names = [e.name for e in it]
        for name in names:
            full = directory / name
            rel = prefix + name
            try:
                st = os.stat(full)  # follows symlinks
            except FileNotFoundError as exc:
                raise ArtifactError(str(full), "broken symlink") from exc
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(full)
                if real in ancestors:
                    raise ArtifactError(str(full), f"symlink cycle back to {real}")
                entries.append((os.fsencode(rel), None))
                visit(full, rel + "/", ancestors | {real})
            elif stat.S_ISREG(st.st_mode):
                entries.append((os.fsencode(rel), full))
            else:
                raise ArtifactError(str(full), "not a regular file or directory")

    visit(root, "", frozenset({os.path.realpath(root)}))
    entries.sort(key=lambda e: e[0])
    return entries


def sha256_dir(path: str | os.PathLike) -> str:
    """Return the deterministic sha256 (hex) of a directory tree; see the module docstring.

    Raises:
        ArtifactError: missing, not a directory, unreadable, a broken link, a cycle or a
            special file inside.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(str(root), "directory not found" if not root.exists() else "not a directory")
    h = hashlib.sha256(_DIR_SCHEME)
    try:
        for rel, file in _dir_entries(root):
            if file is None:
                h.update(b"d" + len(rel).to_bytes(8, "little") + rel)
            else:
                size, digest = _file_digest(file)
                h.update(b"f" + len(rel).to_bytes(8, "little") + rel + size.to_bytes(8, "little") + digest)
    except OSError as exc:
        raise ArtifactError(str(root), f"cannot read directory: {exc}") from exc
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file (:func:`sha256_file`) or a directory (:func:`sha256_dir`).

    Raises:
        ArtifactError: the path is missing or unreadable.
    """
    if Path(path).is_dir():
        return sha256_dir(path)
    return sha256_file(path)


def verify(path: str | os.PathLike, expected_sha256: str) -> None:
    """Check that a file or directory has the recorded sha256.

    Raises:
        ArtifactError: missing, unreadable, or the hash differs (both hashes are named).
        ValueError: ``expected_sha256`` is not 64 hex digits.
    """
    expected = _check_sha(expected_sha256)
    actual = sha256_path(path)
    if actual != expected:
        raise ArtifactError(str(path), f"sha256 mismatch: expected {expected}, got {actual}")


def _read_verified(path: str | os.PathLike, expected_sha256: str | None) -> bytes:
    """Read a whole file; check its hash on these very bytes, so nothing changes in between."""
    expected = None if expected_sha256 is None else _check_sha(expected_sha256)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(str(path), "file not found") from exc
    except OSError as exc:
        raise ArtifactError(str(path), f"cannot read: {exc}") from exc
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ArtifactError(str(path), f"sha256 mismatch: expected {expected}, got {actual}")
    return data


# --- JSON and safetensors --------------------------------------------------------------------

def read_json(path: str | os.PathLike, expected_sha256: str | None = None) -> Any:
    """Read a JSON file, verifying its sha256 first when one is given.

    Raises:
        ArtifactError: missing, unreadable, hash mismatch, or not valid UTF-8 JSON.
    """
    data = _read_verified(path, expected_sha256)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(str(path), f"malformed JSON: {exc}") from exc


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Write tensors as a safetensors file, atomically, with deterministic bytes.

    Tensors are detached, moved to CPU and made contiguous; tensors that share memory
    (tied weights) are each written in full.

    Args:
        path: destination file.
        tensors: name -> dense tensor of a dtype safetensors supports.
        metadata: optional str -> str map stored as ``__metadata__``.
    Returns:
        The sha256 (hex) of the file.
    Raises:
        TypeError / ValueError: bad names, values, dtypes or metadata.
        ArtifactError: the file could not be written.
    """
    import torch

    dtypes = _st_dtypes()
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("metadata must be a dict of str -> str")
    prepared = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name must be a str other than '__metadata__', got {name!r}")
        if not isinstance(t, torch.Tensor) or t.layout is not torch.strided:
            raise TypeError(f"tensor {name!r} must be a dense torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; "
                             f"supported: {sorted(str(d) for d in dtypes)}")
        t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
        prepared.append((-t.element_size(), name, t))
    prepared.sort(key=lambda p: (p[0], p[1]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for _, name, t in prepared:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    try:
        with atomic_open(path) as f:
            for piece in (len(head).to_bytes(8, "little"), head):
                h.update(piece)
                f.write(piece)
            for _, _, t in prepared:
                if t.numel():
                    raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # no copy
                    h.update(raw)
                    f.write(raw)
    except OSError as exc:
        raise ArtifactError(str(path), f"cannot write: {exc}") from exc
    return h.hexdigest()


def load_tensors(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, verifying its sha256 before parsing when one is given.

    Returns:
        name -> CPU tensor (writable, owning its memory).
    Raises:
        ArtifactError: missing, unreadable, hash mismatch, or not a valid safetensors file.
    """
    import safetensors
    import safetensors.torch

    data = _read_verified(path, expected_sha256)
    try:
        return safetensors.torch.load(data)
    # safetensors validates in Rust (SafetensorError); its Python side can still fail on a
    # dtype code it has no torch type for (KeyError) or a shape torch rejects.
    except (safetensors.SafetensorError, KeyError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise ArtifactError(str(path), f"corrupt safetensors file: {exc}") from exc
