"""The compressed checkpoint on disk: the codecs' real bit fields, not decompressed weights.

A package is a directory, published atomically (``serialization.checkpoint.publish_dir``)::

    compressed.safetensors  every parameter's fields, named "<parameter>:<field>": packed bit
                            fields (uint8: RTN codes and zero points at ``bits`` bits each, VPTQ
                            indices at ceil(log2 k) bits, sparse masks at 1 bit, ternary
                            trits five per byte, SeedLM's ``to_bytes``), float16 scales and
                            codebooks; float32 only for "fp32" and ternary's default scales
    compression.json        format tag, per parameter: codec, storage format, shape, dtype,
                            settings, the keys it owns, total_bits, bits_per_weight, nbytes;
                            totals; the sha256 of compressed.safetensors; the caller's manifest
    config.json             the Hugging Face config, as given
    tokenizer files         copied from ``copy_files_from`` when given

So ``compressed.safetensors`` is about ``sum(nbytes)`` long (each field rounds up to a byte;
plus the safetensors header). The file is written by ``serialization.checkpoint.save_tensors``
(deterministic bytes; the safetensors spec) and read by ``load_tensors`` after its sha256 is
checked against compression.json. Nothing is pickled and ``torch.load`` is never used.

:func:`to_tensors` / :func:`from_tensors` (de)serialise one stored tensor; the round trip is
exact (``from_tensors(*to_tensors(s)).decompress()`` equals ``s.decompress()`` bit for bit).
A parameter stored as the very same object as an earlier one (tied weights) is recorded as
``tied_to`` and stored once. Every problem with a package (missing or corrupt files, an
unknown format, a size or shape mismatch) is an ``ArtifactError`` naming the file and the
parameter.
"""

from __future__ import annotations

import importlib
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.errors import ArtifactError
from phases.compression import seedlm, ternary
from phases.compression.codecs import Dense, Stored
from phases.compression.rtn import RTNTensor
from phases.compression.seedlm import SeedLMTensor
from phases.compression.sparse import SparseTensor, pack_mask, unpack_mask
from phases.compression.ternary import TernaryTensor
from phases.compression.vptq import VPTQTensor
from serialization.checkpoint import (atomic_write_json, load_tensors, publish_dir, read_json,
                                      save_tensors)

__all__ = ["FORMAT", "TENSORS_FILE", "MANIFEST_FILE", "TOKENIZER_FILES", "codec_name", "from_tensors",
           "load_model", "load_state_dict", "load_stored", "pack_uint", "save_compressed", "to_tensors",
           "unpack_uint"]

FORMAT = "agentforge-compressed-v1"
TENSORS_FILE = "compressed.safetensors"
MANIFEST_FILE = "compression.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --- bit packing -----------------------------------------------------------------------------

def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) as ``bits`` bits each, most significant first, packed into
    (ceil(n * bits / 8),) uint8.

    Raises:
        ValueError: ``bits`` outside 1-32 or a value that does not fit.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be 1-32, got {bits}")
    v = values.reshape(-1).cpu().numpy().astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values in [{v.min()}, {v.max()}] do not fit in {bits} unsigned bits")
    if bits == 8:
        return torch.from_numpy(v.astype(np.uint8))
    v = v.astype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)
    plane = np.empty((v.size, bits), dtype=np.uint8)
    for k in range(bits):
        plane[:, k] = (v >> (bits - 1 - k)) & 1
    return torch.from_numpy(np.packbits(plane.reshape(-1)))


def unpack_uint(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``count`` values (int64).

    Raises:
        ValueError: ``packed`` is not uint8 of exactly ceil(count * bits / 8) bytes.
    """
    need = (count * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"{count} values of {bits} bits need {need} uint8 bytes, got "
                         f"{packed.numel()} {packed.dtype} of shape {tuple(packed.shape)}")
    raw = packed.numpy()
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    plane = np.unpackbits(raw)[: count * bits].reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for k in range(bits):
        out = (out << 1) | plane[:, k]
    return torch.from_numpy(out)


def _index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


# --- one stored tensor <-> (meta, tensors) ---------------------------------------------------

def codec_name(stored: Stored) -> str:
    """The codec name ``codecs.encode`` takes for this stored tensor (inner codec when sparse)."""
    if isinstance(stored, SparseTensor):
        return codec_name(stored.values)
    if isinstance(stored, Dense):
        return {torch.float16: "fp16", torch.float32: "fp32"}.get(stored.values.dtype, str(stored.values.dtype))
    if isinstance(stored, RTNTensor):
        return f"int{stored.bits}"
    if isinstance(stored, SeedLMTensor):
        return "seedlm"
    if isinstance(stored, VPTQTensor):
        return "vptq"
    if isinstance(stored, TernaryTensor):
        return "ternary"
    raise TypeError(f"no serialiser for {type(stored).__name__}; known: Dense, RTNTensor, SeedLMTensor, "
                    "VPTQTensor, TernaryTensor, SparseTensor")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_tensors(stored: Stored) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Serialise one stored tensor: JSON-able meta and its fields as uint8/int/float16 tensors.

    Returns:
        (meta with "format", "shape", "dtype", "settings" and format fields; field -> tensor).
    Raises:
        TypeError: not a stored type this module knows.
    """
    base = {"shape": list(getattr(stored, "shape", ())), "dtype": _dtype_name(stored.dtype)}
    if isinstance(stored, Dense):
        meta = {"format": "dense", **base, "settings": {"storage": _dtype_name(stored.values.dtype)}}
        return meta, {"values": stored.values.detach().cpu().contiguous()}
    if isinstance(stored, RTNTensor):
        meta = {"format": "rtn", **base, "settings": {"bits": stored.bits, "group_size": stored.group_size}}
        return meta, {"codes": pack_uint(stored.codes, stored.bits), "zeros": pack_uint(stored.zeros, stored.bits),
                      "scales": stored.scales.to(torch.float16).contiguous()}
    if isinstance(stored, SeedLMTensor):
        meta = {"format": "seedlm", **base,
                "settings": {"block": stored.block, "latent": stored.latent, "seed_bits": stored.seed_bits}}
        return meta, {"data": torch.from_numpy(np.frombuffer(stored.to_bytes(), dtype=np.uint8).copy())}
    if isinstance(stored, VPTQTensor):
        k = len(stored.codebook)
        k_res = 0 if stored.residual_codebook is None else len(stored.residual_codebook)
        meta = {"format": "vptq", **base, "settings": {
            "vector_len": stored.vector_len, "centroids": k, "residual_centroids": k_res,
            "normalize": stored.scale is not None, "permute": stored.perm is not None}}
        out = {"codebook": stored.codebook.to(torch.float16).contiguous(),
               "indices": pack_uint(stored.indices, _index_bits(k))}
        if k_res:
            out["residual_codebook"] = stored.residual_codebook.to(torch.float16).contiguous()
            out["residual_indices"] = pack_uint(stored.residual_indices, _index_bits(k_res))
        if stored.scale is not None:
            out["scale"], out["offset"] = stored.scale.to(torch.float16), stored.offset.to(torch.float16)
        if stored.perm is not None:
            out["perm"] = pack_uint(stored.perm, _index_bits(stored.shape[1]))
        return meta, out
    if isinstance(stored, TernaryTensor):
        meta = {"format": "ternary", **base, "settings": {"scale_dtype": stored.scale_dtype}}
        return meta, {"codes": stored.codes.detach().cpu().contiguous(),
                      "scales": stored.scales.detach().cpu().contiguous()}
    if isinstance(stored, SparseTensor):
        inner_meta, inner = to_tensors(stored.values)
        meta = {"format": "sparse", **base, "settings": {"nnz": stored.nnz}, "inner": inner_meta}
        return meta, {"mask": pack_mask(stored.mask), **{f"values.{k}": t for k, t in inner.items()}}
    codec_name(stored)  # raises the TypeError naming the known types
    raise AssertionError("unreachable")


class _Reader:
    """Checked access to one parameter's meta and tensors; every failure names path and parameter."""

    def __init__(self, meta: Any, tensors: Mapping[str, torch.Tensor], path: str, name: str):
        self.meta, self.tensors, self.path, self.name = meta, tensors, path, name

    def fail(self, message: str) -> ArtifactError:
        return ArtifactError(self.path, f"parameter {self.name!r}: {message}")

    def field(self, key: str, kind: type, source: Any = None) -> Any:
        source = self.meta if source is None else source
        value = source.get(key) if isinstance(source, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"meta field {key!r} must be {kind.__name__}, got {value!r}")
        return value

    def setting(self, key: str, kind: type = int, lo: int | None = None) -> Any:
        value = self.field(key, kind, self.field("settings", dict))
        if lo is not None and value < lo:
            raise self.fail(f"setting {key!r} must be >= {lo}, got {value}")
        return value

    def shape(self) -> tuple[int, ...]:
        shape = self.field("shape", list)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise self.fail(f"shape must be a list of non-negative ints, got {shape!r}")
        return tuple(shape)

    def dtype(self, key: str = "dtype", source: Any = None) -> torch.dtype:
        name = self.field(key, str, source)
        if name not in _DTYPES:
            raise self.fail(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[name]

    def tensor(self, key: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.tensors:
            raise self.fail(f"tensor field {key!r} is missing (have {sorted(self.tensors)})")
        t = self.tensors[key]
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
            raise self.fail(f"tensor field {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                            f"{tuple(shape) if shape is not None else ''}".rstrip())
        return t

    def packed(self, key: str, bits: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            return unpack_uint(self.tensor(key, torch.uint8), bits, count).reshape(shape)
        except ValueError as exc:
            raise self.fail(f"tensor field {key!r}: {exc}") from exc


def from_tensors(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor], *, path: str = "<tensors>",
                 name: str = "<parameter>") -> Stored:
    """Rebuild a stored tensor from :func:`to_tensors`' output (fields under their local names).

    Args:
        path, name: the file and parameter named in errors.
    Raises:
        ArtifactError: an unknown format, a missing field, or sizes that disagree with the meta.
    """
    r = _Reader(meta, tensors, path, name)
    fmt = r.field("format", str)
    shape, dtype = r.shape(), r.dtype()
    numel = math.prod(shape)
    if fmt == "dense":
        storage = r.dtype("storage", r.field("settings", dict))
        return Dense(r.tensor("values", storage, shape), dtype)
    if fmt == "rtn":
        bits, group = r.setting("bits", lo=1), r.setting("group_size", lo=1)
        if bits > 8:
            raise r.fail(f"RTN bits must be 1-8, got {bits}")
        cols = shape[-1] if shape else 1
        rows, groups = (numel // cols if cols else 0), -(-cols // group)
        codes = r.packed("codes", bits, rows * groups * group, (rows, groups, group)).to(torch.uint8)
        zeros = r.packed("zeros", bits, rows * groups, (rows, groups)).to(torch.uint8)
        scales = r.tensor("scales", torch.float16, (rows, groups))
        return RTNTensor(shape, bits, group, codes, scales, zeros, dtype)
    if fmt == "seedlm":
        block, latent, seed_bits = r.setting("block", lo=1), r.setting("latent", lo=1), r.setting("seed_bits")
        if latent > block or seed_bits not in seedlm.TAPS:
            raise r.fail(f"SeedLM settings (block={block}, latent={latent}, seed_bits={seed_bits}) are invalid; "
                         f"seed_bits must be one of {sorted(seedlm.TAPS)} and latent <= block")
        data = r.tensor("data", torch.uint8)
        try:
            return seedlm.from_bytes(data.numpy().tobytes(), shape, block=block, latent=latent,
                                     seed_bits=seed_bits, dtype=dtype)
        except ValueError as exc:
            raise r.fail(f"tensor field 'data': {exc}") from exc
    if fmt == "vptq":
        if len(shape) != 2:
            raise r.fail(f"VPTQ stores 2-D weights, meta shape is {shape}")
        out, cols = shape
        v, k, k_res = r.setting("vector_len", lo=1), r.setting("centroids", lo=2), r.setting("residual_centroids")
        if k_res == 1 or k_res < 0:
            raise r.fail(f"residual_centroids must be 0 or >= 2, got {k_res}")
        normalize, permute = r.setting("normalize", bool), r.setting("permute", bool)
        vec_rows = -(-out // v)
        codebook = r.tensor("codebook", torch.float16, (k, v))
        indices = r.packed("indices", _index_bits(k), vec_rows * cols, (vec_rows, cols))
        res_cb = res_idx = scale = offset = perm = None
        if k_res:
            res_cb = r.tensor("residual_codebook", torch.float16, (k_res, v))
            res_idx = r.packed("residual_indices", _index_bits(k_res), vec_rows * cols, (vec_rows, cols))
        for key, idx, size in (("indices", indices, k), ("residual_indices", res_idx, k_res)):
            if idx is not None and idx.numel() and int(idx.max()) >= size:
                raise r.fail(f"tensor field {key!r} holds index {int(idx.max())} into a codebook of {size}")
        if normalize:
            scale, offset = r.tensor("scale", torch.float16, (out,)), r.tensor("offset", torch.float16, (out,))
        if permute:
            perm = r.packed("perm", _index_bits(cols), cols, (cols,))
            if not torch.equal(torch.sort(perm).values, torch.arange(cols)):
                raise r.fail(f"tensor field 'perm' is not a permutation of {cols} columns")
        return VPTQTensor((out, cols), v, codebook, indices, res_cb, res_idx, scale, offset, perm, dtype)
    if fmt == "ternary":
        scale_dtype = r.setting("scale_dtype", str)
        if scale_dtype not in ternary.SCALE_DTYPES:
            raise r.fail(f"setting 'scale_dtype' must be one of {sorted(ternary.SCALE_DTYPES)}, got {scale_dtype!r}")
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        scales = r.tensor("scales", ternary.SCALE_DTYPES[scale_dtype], (rows,))
        codes = r.tensor("codes", torch.uint8)
        try:
            ternary.check_packed(codes, numel)
        except ValueError as exc:
            raise r.fail(f"tensor field 'codes': {exc}") from exc
        return TernaryTensor(shape, codes, scales, dtype)
    if fmt == "sparse":
        nnz = r.setting("nnz", lo=0)
        try:
            mask = unpack_mask(r.tensor("mask", torch.uint8), numel)
        except ValueError as exc:
            raise r.fail(f"tensor field 'mask': {exc}") from exc
        if int(mask.sum()) != nnz:
            raise r.fail(f"the mask keeps {int(mask.sum())} weights but the meta says nnz={nnz}")
        inner_meta = r.field("inner", dict)
        inner = {k.removeprefix("values."): t for k, t in tensors.items() if k.startswith("values.")}
        values = from_tensors(inner_meta, inner, path=path, name=f"{name} (kept values)")
        if values.numel != nnz:
            raise r.fail(f"the kept values hold {values.numel} weights, the mask keeps {nnz}")
        return SparseTensor(shape, mask, values, dtype)
    raise r.fail(f"unknown storage format {fmt!r}; known: dense, rtn, seedlm, vptq, ternary, sparse")


# --- the package -----------------------------------------------------------------------------

def _param_entry(name: str, stored: Stored) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta, fields = to_tensors(stored)
    keys = {f"{name}:{k}": t for k, t in fields.items()}
    entry = {"codec": codec_name(stored), "sparse": isinstance(stored, SparseTensor), **meta,
             "keys": sorted(keys), "numel": stored.numel, "total_bits": stored.total_bits,
             "bits_per_weight": stored.bits_per_weight, "nbytes": stored.nbytes}
    return entry, keys


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    if not src.is_dir():
        raise ArtifactError(str(src), "copy_files_from: directory not found")
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    names += sorted(p.name for pattern in ("*.txt", "*.model") for p in src.glob(pattern) if p.is_file())
    for n in names:
        try:
            shutil.copyfile(src / n, dst / n)
        except OSError as exc:
            raise ArtifactError(str(src / n), f"cannot copy: {exc}") from exc
    return names


def save_compressed(out_dir: str | Path, stored: Mapping[str, Stored], *, hf_config: dict | Any,
                    copy_files_from: Path | None = None, manifest: dict | None = None) -> dict[str, Any]:
    """Write a compressed package (see the module docstring) and publish it atomically.

    Args:
        out_dir: the package directory (replaced as a whole if it exists).
        stored: parameter name -> stored tensor; the same object under two names is stored once.
        hf_config: the model's HF config as a dict (a ``PretrainedConfig`` is turned into one).
        copy_files_from: a model directory whose tokenizer files are copied along.
        manifest: the caller's JSON-able record, kept under ``"manifest"`` in compression.json.
    Returns:
        compression.json's content plus ``files`` (name -> bytes) and ``bytes_on_disk`` (their sum).
    Raises:
        ArtifactError: a file could not be written, or config/manifest are not JSON-able.
        ValueError / TypeError: a bad parameter name or an unknown stored type.
    """
    out = Path(out_dir)
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config
    if not isinstance(config, dict):
        raise TypeError(f"hf_config must be a dict, got {type(hf_config).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        params: dict[str, dict[str, Any]] = {}
        tensors: dict[str, torch.Tensor] = {}
        first: dict[int, str] = {}  # id(stored) -> first name (tied weights)
        for name, s in stored.items():
            if not isinstance(name, str) or not name or ":" in name:
                raise ValueError(f"parameter names must be non-empty strings without ':', got {name!r}")
            if id(s) in first:
                twin = params[first[id(s)]]
                params[name] = {"tied_to": first[id(s)], "shape": twin["shape"], "dtype": twin["dtype"]}
                continue
            first[id(s)] = name
            params[name], fields = _param_entry(name, s)
            tensors.update(fields)
        sha = save_tensors(tmp / TENSORS_FILE, tensors)
        owners = [p for p in params.values() if "tied_to" not in p]
        total_bits, numel = sum(p["total_bits"] for p in owners), sum(p["numel"] for p in owners)
        doc = {"format": FORMAT, "parameters": params, "tensors": {"file": TENSORS_FILE, "sha256": sha},
               "totals": {"parameters": len(params), "stored_parameters": len(owners), "numel": numel,
                          "total_bits": total_bits, "nbytes": sum(p["nbytes"] for p in owners),
                          "bits_per_weight": total_bits / numel if numel else 0.0},
               "manifest": dict(manifest or {})}
        doc["copied_files"] = _copy_side_files(Path(copy_files_from), tmp) if copy_files_from is not None else []
        atomic_write_json(tmp / MANIFEST_FILE, doc)
        atomic_write_json(tmp / "config.json", config)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {**doc, "files": files, "bytes_on_disk": sum(files.values())}


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ArtifactError(str(root), "compressed package directory not found" if not root.exists()
                            else "not a directory")
    path = root / MANIFEST_FILE
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(str(path), f"not a compressed package: format {got!r}, expected {FORMAT!r}")
    if not isinstance(doc.get("parameters"), dict) or not isinstance(doc.get("tensors"), dict):
        raise ArtifactError(str(path), "missing 'parameters' or 'tensors' section")
    return doc


def load_stored(pkg_dir: str | Path) -> dict[str, Stored]:
    """The stored tensors of a package, without decompressing (tied names share one object).

    Raises:
        ArtifactError: a missing or corrupt file (sha256 checked), or an inconsistent parameter.
    """
    root = Path(pkg_dir)
    doc = _read_manifest(root)
    st_path = root / TENSORS_FILE
    sha = doc["tensors"].get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ArtifactError(str(root / MANIFEST_FILE), f"tensors.sha256 must be 64 hex digits, got {sha!r}")
    tensors = load_tensors(st_path, expected_sha256=sha)
    out: dict[str, Stored] = {}
    owned: set[str] = set()
    params = doc["parameters"]
    for name, entry in params.items():
        if isinstance(entry, dict) and "tied_to" in entry:
            continue
        keys = entry.get("keys") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) and k.startswith(f"{name}:") for k in keys):
            raise ArtifactError(str(root / MANIFEST_FILE), f"parameter {name!r}: bad 'keys' {keys!r}")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ArtifactError(str(st_path), f"parameter {name!r}: tensors {missing} are missing")
        owned.update(keys)
        out[name] = from_tensors(entry, {k[len(name) + 1:]: tensors[k] for k in keys}, path=str(st_path), name=name)
    stray = sorted(set(tensors) - owned)
    if stray:
        raise ArtifactError(str(st_path), f"tensors owned by no parameter: {stray[:5]}")
    for name, entry in params.items():
        if isinstance(entry, dict) and "tied_to" in entry:
            if not isinstance(entry["tied_to"], str) or entry["tied_to"] not in out:
                raise ArtifactError(str(root / MANIFEST_FILE), f"parameter {name!r} is tied to "
                                    f"{entry['tied_to']!r}, which is not stored")
            out[name] = out[entry["tied_to"]]
    return out


def load_state_dict(pkg_dir: str | Path) -> dict[str, torch.Tensor]:
    """Decompress every parameter of a package: name -> tensor (tied names share one tensor).

    Raises:
        ArtifactError: see :func:`load_stored`.
    """
    decoded: dict[int, torch.Tensor] = {}
    state = {}
    for name, s in load_stored(pkg_dir).items():
        if id(s) not in decoded:
            decoded[id(s)] = s.decompress()
        state[name] = decoded[id(s)]
    return state


def load_model(pkg_dir: str | Path) -> torch.nn.Module:
    """The causal LM of a package: ``AutoConfig`` from config.json, ``from_config``, the
    decompressed weights loaded with ``strict=True``, eval mode. Cognate is registered first.
    A parameter the model ties to another (lm_head / embeddings) may be absent from the package;
    it is filled from its twin.

    Raises:
        ArtifactError: a bad config.json, package files, or parameters that do not match the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    importlib.import_module("phases.cognate.modeling")  # registers model_type "cognate" with the Auto classes

    root = Path(pkg_dir)
    if not (root / "config.json").is_file():
        raise ArtifactError(str(root / "config.json"), "file not found")
    try:
        config = AutoConfig.from_pretrained(str(root))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(str(root / "config.json"), f"cannot build the HF config: {exc}") from exc
    model = AutoModelForCausalLM.from_config(config)
    state = load_state_dict(root)
    expected = model.state_dict()
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, t in expected.items():
        by_storage.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    for names in by_storage.values():  # tied parameters: fill an absent one from a present twin
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
    where = str(root / TENSORS_FILE)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(where, f"parameters do not match the {type(model).__name__} built from config.json: "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise ArtifactError(where, f"parameter {k!r} has shape {tuple(state[k].shape)} in the package, "
                                       f"the model expects {tuple(t.shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()
