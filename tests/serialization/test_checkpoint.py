"""Tests of checkpoint IO: atomic writes, sha256 of files and trees, safetensors, JSON, verify."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from coordinator.errors import ArtifactError
from serialization import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    sha256_dir,
    sha256_file,
    sha256_path,
    verify,
)

ROOT = Path(__file__).resolve().parents[2]


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- atomic writes ---------------------------------------------------------------------------

def test_atomic_writes_produce_the_bytes_and_return_their_hash(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "dir" / "a.bin"
    sha = atomic_write_bytes(p, b"hello")
    assert p.read_bytes() == b"hello" and sha == hashlib.sha256(b"hello").hexdigest()
    assert atomic_write_text(tmp_path / "t.txt", "héllo\n") == sha256_file(tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert leftovers(p.parent) == [] and leftovers(tmp_path) == []


def test_atomic_write_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_old_file_untouched_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "model.bin"
    p.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="serialiser failed"), atomic_open(p) as f:
        f.write(b"half of the new")
        raise RuntimeError("serialiser failed")
    assert p.read_bytes() == b"old contents" and leftovers(tmp_path) == []


def test_failed_json_serialisation_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "result.json"
    atomic_write_json(p, {"ok": 1})
    before = p.read_bytes()
    with pytest.raises(ArtifactError, match=r"result.json: cannot write JSON: .*not JSON serializable"):
        atomic_write_json(p, {"ok": 2, "bad": [object()]})
    with pytest.raises(ArtifactError, match="Out of range float values are not JSON compliant"):
        atomic_write_json(p, {"loss": float("nan")})
    assert p.read_bytes() == before and leftovers(tmp_path) == []


def test_failure_inside_save_tensors_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "model.safetensors"
    sha = save_tensors(p, {"w": torch.ones(3)})

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ArtifactError, match="model.safetensors: cannot write: .*No space left"):
        save_tensors(p, {"w": torch.zeros(1000)})
    monkeypatch.undo()
    assert sha256_file(p) == sha and leftovers(tmp_path) == []
    assert torch.equal(load_tensors(p, sha)["w"], torch.ones(3))


def test_atomic_write_json_is_deterministic_and_formatted(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    sha_a = atomic_write_json(a, {"b": [1, 2], "a": {"y": "é", "x": None}})
    sha_b = atomic_write_json(b, {"a": {"x": None, "y": "é"}, "b": [1, 2]})
    assert sha_a == sha_b
    assert a.read_text(encoding="utf-8") == '{\n  "a": {\n    "x": null,\n    "y": "é"\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'


# --- hashing ---------------------------------------------------------------------------------

def make_tree(root: Path) -> Path:
    (root / "tok").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 100)
    (root / "tok" / "vocab.txt").write_text("a\nb\n")
    return root


def reference_dir_hash(root: Path) -> str:
    """The documented scheme, implemented independently of the module."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix().encode()
            entries.append((rel, full))
    h = hashlib.sha256(b"agentforge-sha256-dir-v1\0")
    for rel, full in sorted(entries):
        if full.is_dir():
            h.update(b"d" + len(rel).to_bytes(8, "little") + rel)
        else:
            data = full.read_bytes()
            h.update(b"f" + len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little")
                     + hashlib.sha256(data).digest())
    return h.hexdigest()


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    p = tmp_path / "big"
    data = os.urandom(3 * 1024 * 1024 + 5)
    p.write_bytes(data)
    assert sha256_file(p) == sha256_path(p) == hashlib.sha256(data).hexdigest()


def test_sha256_dir_follows_the_documented_scheme(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "m")
    assert sha256_dir(root) == reference_dir_hash(root) == sha256_path(root)


def test_sha256_dir_changes_with_any_change(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "m")
    base = sha256_dir(root)
    flip_bit(root / "model.safetensors", 12_345, 3)
    assert sha256_dir(root) != base
    flip_bit(root / "model.safetensors", 12_345, 3)
    assert sha256_dir(root) == base
    (root / "tok" / "vocab.txt").rename(root / "tok" / "vocab2.txt")
    renamed = sha256_dir(root)
    assert renamed != base
    (root / "tok" / "vocab2.txt").rename(root / "tok" / "vocab.txt")
    (root / "empty").rmdir()
    assert sha256_dir(root) not in (base, renamed)
    (root / "empty").mkdir()
    (root / ".hidden").write_bytes(b"")
    assert sha256_dir(root) != base


def test_sha256_dir_follows_symlinks_and_rejects_cycles(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "m")
    copy = make_tree(tmp_path / "c")
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors").symlink_to(root / "model.safetensors")
    assert sha256_dir(copy) == sha256_dir(root)
    (root / "tok" / "loop").symlink_to(root)
    with pytest.raises(ArtifactError, match="symlink cycle"):
        sha256_dir(root)
    (root / "tok" / "loop").unlink()
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="broken symlink"):
        sha256_dir(root)


def test_hash_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="missing.bin: file not found"):
        sha256_file(tmp_path / "missing.bin")
    with pytest.raises(ArtifactError, match="nodir: directory not found"):
        sha256_dir(tmp_path / "nodir")
    with pytest.raises(ArtifactError, match="is a directory"):
        sha256_file(tmp_path)


def test_verify_names_both_hashes(tmp_path: Path) -> None:
    p = tmp_path / "a"
    sha = atomic_write_bytes(p, b"abc")
    verify(p, sha)
    verify(p, sha.upper())
    wrong = "0" * 64
    with pytest.raises(ArtifactError) as info:
        verify(p, wrong)
    assert f"expected {wrong}, got {sha}" in str(info.value) and info.value.path == str(p)
    with pytest.raises(ValueError, match="64 hex digits"):
        verify(p, "abc")
    verify(make_tree(tmp_path / "tree"), sha256_dir(tmp_path / "tree"))


# --- JSON ------------------------------------------------------------------------------------

def test_read_json_verifies_and_names_bad_files(tmp_path: Path) -> None:
    p = tmp_path / "result.json"
    sha = atomic_write_json(p, {"success": True, "metrics": {"loss": 0.5}})
    assert read_json(p, sha) == {"success": True, "metrics": {"loss": 0.5}}
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        read_json(p, "f" * 64)
    p.write_text('{"success": tru')
    with pytest.raises(ArtifactError, match=r"result.json: malformed JSON: Expecting value: line 1"):
        read_json(p)
    p.write_bytes(b'"\xff"')
    with pytest.raises(ArtifactError, match="result.json: malformed JSON"):
        read_json(p)
    with pytest.raises(ArtifactError, match="file not found"):
        read_json(tmp_path / "none.json")


# --- safetensors -----------------------------------------------------------------------------

def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen)
    return {
        "w": w, "w_t": w.t(), "bias": torch.randn(4, generator=gen).to(torch.bfloat16),
        "half": torch.randn(3, generator=gen).half(), "ids": torch.arange(5), "mask": torch.tensor([True, False]),
        "q": torch.randint(-128, 127, (7,), dtype=torch.int8), "u": torch.arange(3, dtype=torch.uint8),
        "f8": torch.randn(4, generator=gen).to(torch.float8_e4m3fn), "z": torch.randn(2, dtype=torch.complex64),
        "scalar": torch.tensor(3.0, dtype=torch.float64), "empty": torch.empty(0, 3), "u16": torch.arange(4).to(torch.uint16),
        "grad": torch.ones(2, requires_grad=True) * 2,
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def test_save_and_load_tensors_roundtrip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    p = tmp_path / "model.safetensors"
    sha = save_tensors(p, tensors, metadata={"format": "pt", "phase": "cognate"})
    assert sha == sha256_file(p)
    out = load_tensors(p, expected_sha256=sha)
    assert list(out) and set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(bits(out[name]), bits(t)), name
        out[name].reshape(-1)[:0].zero_()  # writable
    with safetensors.safe_open(p, "pt") as f:  # the reference reader agrees, metadata included
        assert f.metadata() == {"format": "pt", "phase": "cognate"}
        assert torch.equal(f.get_tensor("w_t"), tensors["w_t"])


def test_save_tensors_is_deterministic(tmp_path: Path) -> None:
    tensors = sample_tensors()
    meta = {f"k{i}": str(i) for i in range(20)}
    sha1 = save_tensors(tmp_path / "a.safetensors", tensors, metadata=meta)
    rev = dict(reversed(list(tensors.items())))
    sha2 = save_tensors(tmp_path / "b.safetensors", rev, metadata=dict(reversed(list(meta.items()))))
    assert sha1 == sha2


def test_hashes_and_checkpoints_are_stable_across_processes(tmp_path: Path) -> None:
    """Different hash seeds (dict/set order) must not change a directory hash or a checkpoint.

    The same subprocess checks that checkpoint IO does not import msgpack (CONVENTIONS rule 1).
    """
    root = make_tree(tmp_path / "m")
    code = ("import sys, torch; from serialization import save_tensors, sha256_dir; "
            "t = {'a': torch.arange(6.).reshape(2, 3), 'b': torch.ones(2, dtype=torch.int8)}; "
            "print(sha256_dir(sys.argv[1]), save_tensors(sys.argv[2], t, {f'k{i}': str(i) for i in range(20)})); "
            "assert 'msgpack' not in sys.modules, 'checkpoint IO must not import the codec (phases/ use it)'")
    outs = {subprocess.run([sys.executable, "-c", code, str(root), str(tmp_path / f"p{seed}.st")], cwd=ROOT,
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}
                           ).stdout.strip() for seed in ("1", "2")}
    assert len(outs) == 1 and outs.pop().split()[0] == sha256_dir(root)


def test_save_tensors_matches_the_reference_writer_without_metadata(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(10.0), "a": torch.ones(2, 3), "c": torch.zeros(0)}
    save_tensors(tmp_path / "ours.safetensors", tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == safetensors.torch.save(tensors)


def test_load_tensors_detects_a_flipped_bit_and_returns_nothing(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    sha = save_tensors(p, {"w": torch.randn(100, 100)})
    size = p.stat().st_size
    for offset in (3, 40, size // 2, size - 1):  # header length, header JSON, data
        flip_bit(p, offset, 5)
        with pytest.raises(ArtifactError, match=f"sha256 mismatch: expected {sha}, got"):
            load_tensors(p, expected_sha256=sha)
        flip_bit(p, offset, 5)
    assert torch.equal(load_tensors(p, sha)["w"], load_tensors(p)["w"])


@pytest.mark.parametrize("data", [b"", b"\x08\x00", b"\xff" * 16, b"\x05\x00\x00\x00\x00\x00\x00\x00{oops",
                                  b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'])
def test_load_tensors_rejects_corrupt_files(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(data)
    with pytest.raises(ArtifactError, match="bad.safetensors: corrupt safetensors file"):
        load_tensors(p)


def test_load_tensors_missing_file_and_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="file not found"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="complex128"):
        save_tensors(tmp_path / "x", {"z": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(TypeError, match="metadata must be a dict of str -> str"):
        save_tensors(tmp_path / "x", {"a": torch.zeros(1)}, metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="must be a dense torch.Tensor"):
        save_tensors(tmp_path / "x", {"a": [1, 2]})  # type: ignore[dict-item]
    assert not (tmp_path / "x").exists()


def test_written_json_metadata_is_readable_by_others(tmp_path: Path) -> None:
    sha = save_tensors(tmp_path / "m.safetensors", {"w": torch.ones(1)}, metadata={"a": "1"})
    raw = (tmp_path / "m.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    assert json.loads(raw[8: 8 + n])["__metadata__"] == {"a": "1"}
    assert sha == hashlib.sha256(raw).hexdigest()
