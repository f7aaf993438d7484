"""Phase 8's codec registry and on-disk package: every codec round-trips exactly through the
files, bit counts are exact, sparse storage keeps pruned zeros and saves bits, a tiny Cognate
model saved with mixed codecs loads with strict=True, and bad packages raise typed errors
naming the file and parameter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from coordinator.errors import ArtifactError, ConfigError
from phases.cognate.modeling import CognateForCausalLM
from phases.compression import codecs, package
from phases.compression.rtn import RTNTensor
from phases.compression.sparse import SparseTensor
from phases.compression.vptq import VPTQTensor
from phases.data import byte_tokenizer
from tests.phases.tiny_cognate import tiny_cognate

SEEDLM = {"block": 8, "latent": 3, "seed_bits": 8}  # 2^8 seeds: fast; the codec is the same


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pruned(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    cut = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
    return torch.where(w.abs() > cut, w, torch.zeros_like(w))


# ---------------------------------------------------------------- codecs and exact round trips

CASES = {
    "fp32": (_randn(24, 40), "fp32", {}, False),
    "fp16": (_randn(3, 5, 7, seed=1), "fp16", {}, False),
    "int8": (_randn(24, 40, seed=2), "int8", {}, False),
    "int8_grouped": (_randn(24, 40, seed=3), "int8", {"group_size": 16}, False),
    "int4": (_randn(24, 40, seed=4), "int4", {}, False),
    "int4_vector": (_randn(101, seed=5), "int4", {"group_size": 32}, False),
    "seedlm": (_randn(12, 13, seed=6), "seedlm", SEEDLM, False),
    "vptq": (_randn(30, 24, seed=7), "vptq", {"centroids": 12, "vector_len": 4}, False),
    "vptq_residual": (_randn(32, 16, seed=8), "vptq", {"centroids": 16, "residual_centroids": 4,
                                                       "normalize": True, "kiter": 20}, False),
    "sparse_fp16": (_pruned(_randn(24, 40, seed=9), 0.6), "fp16", {}, True),
    "sparse_int8": (_pruned(_randn(24, 40, seed=10), 0.6), "int8", {}, True),
    "sparse_int4": (_pruned(_randn(24, 40, seed=11), 0.6), "int4", {}, True),
    "sparse_seedlm": (_pruned(_randn(12, 16, seed=12), 0.6), "seedlm", SEEDLM, True),
}


@pytest.fixture(scope="module")
def stored():
    return {name: codecs.encode(w, c, s, sparse=sp, name=name) for name, (w, c, s, sp) in CASES.items()}


@pytest.fixture(scope="module")
def saved(stored, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "model"
    info = package.save_compressed(out, stored, hf_config={"model_type": "none"}, manifest={"run": "test"})
    return out, info


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_codec_round_trips_exactly_in_memory_and_through_the_files(name, stored, saved):
    s = stored[name]
    meta, tensors = package.to_tensors(s)
    assert all(t.dtype in (torch.uint8, torch.float16, torch.float32) for t in tensors.values())
    if CASES[name][1] != "fp32":  # float32 only holds the fp32 codec's values
        assert all(t.dtype != torch.float32 for t in tensors.values())
    assert torch.equal(package.from_tensors(meta, tensors).decompress(), s.decompress())
    back = package.load_stored(saved[0])[name]
    assert type(back) is type(s) and back.total_bits == s.total_bits
    assert torch.equal(back.decompress(), s.decompress())
    entry = saved[1]["parameters"][name]
    assert entry["codec"] == CASES[name][1] and entry["sparse"] == isinstance(s, SparseTensor)
    assert entry["shape"] == list(CASES[name][0].shape) and entry["total_bits"] == s.total_bits
    assert entry["bits_per_weight"] == s.bits_per_weight and entry["keys"]


def test_the_file_holds_the_packed_bits_and_the_manifest_its_sizes(stored, saved):
    out, info = saved
    payload = sum(s.nbytes for s in stored.values())
    size = (out / package.TENSORS_FILE).stat().st_size
    assert payload <= size <= payload * 1.05 + 64 * 1024
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in out.iterdir())
    assert info["totals"]["nbytes"] == payload and info["manifest"] == {"run": "test"}
    on_disk = json.loads((out / package.MANIFEST_FILE).read_text())
    assert on_disk["parameters"] == info["parameters"] and on_disk["format"] == package.FORMAT
    assert json.loads((out / "config.json").read_text()) == {"model_type": "none"}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
def test_bit_packing_round_trips_and_uses_exactly_the_bits(bits):
    values = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = package.pack_uint(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(package.unpack_uint(packed, bits, 1001), values)
    with pytest.raises(ValueError):
        package.pack_uint(torch.tensor([2**bits]), bits)
    with pytest.raises(ValueError):
        package.unpack_uint(packed[:-1], bits, 1001)


def test_bits_per_weight_are_exact_for_known_shapes():
    w = _randn(64, 48)
    assert codecs.encode(w, "fp32").bits_per_weight == 32.0
    assert codecs.encode(w, "fp16").bits_per_weight == 16.0
    assert codecs.encode(w, "int8").bits_per_weight == (48 * 8 + 16 + 8) / 48  # per-row scale + zero
    assert codecs.encode(_randn(64, 64), "int4").bits_per_weight == (32 * 4 + 16 + 4) / 32  # group 32
    assert codecs.encode(w, "int4").bits_per_weight == (64 * 4 + 2 * (16 + 4)) / 48  # 48 cols pad to 64
    for c, s in [("fp16", {}), ("int8", {}), ("int8", {"group_size": 20}), ("int4", {}), ("seedlm", SEEDLM)]:
        assert codecs.planned_bits((64, 48), c, s) == codecs.encode(w, c, s).total_bits, (c, s)


def test_sparse_keeps_zeros_exactly_and_beats_dense_int8_at_60_percent():
    w = _pruned(_randn(64, 96, seed=3), 0.6)
    zeros = w == 0
    assert abs(float(zeros.float().mean()) - 0.6) < 0.01
    dense, sparse = codecs.encode(w, "int8"), codecs.encode(w, "int8", sparse=True)
    assert isinstance(dense, RTNTensor) and isinstance(sparse, SparseTensor)
    assert sparse.total_bits < dense.total_bits
    assert sparse.total_bits == w.numel() + sparse.values.total_bits  # 1 mask bit per weight
    out = sparse.decompress()
    assert out.shape == w.shape and torch.equal(out[zeros], torch.zeros(int(zeros.sum())))
    assert float((out - w).abs().max()) < 0.02 and not bool((out[~zeros] == 0).all())
    # a dense weight stays dense; VPTQ ignores sparse=True (dense-only)
    assert isinstance(codecs.encode(_randn(64, 96), "int8", sparse=True), RTNTensor)
    assert isinstance(codecs.encode(w, "vptq", {"centroids": 16, "kiter": 5}, sparse=True), VPTQTensor)
    assert not codecs.sparse_worthwhile(w, "vptq") and codecs.sparse_worthwhile(w, "int8")
    # everything pruned: a mask and nothing else
    empty = codecs.encode(torch.zeros(8, 8), "int4", sparse=True)
    assert empty.total_bits == 64 and torch.equal(empty.decompress(), torch.zeros(8, 8))


def test_unknown_codecs_and_settings_are_config_errors_listing_the_valid_ones():
    w = _randn(8, 8)
    with pytest.raises(ConfigError, match="registered codecs: fp16, fp32, int4, int8, seedlm, ternary, vptq"):
        codecs.encode(w, "int3")
    with pytest.raises(ConfigError, match="'bits'.*allowed: group_size"):
        codecs.encode(w, "int8", {"bits": 4}, name="layer.weight")
    with pytest.raises(ConfigError, match=r"'conv.weight': codec 'vptq' quantises 2-D weights only, got shape"):
        codecs.encode(_randn(2, 4, 8), "vptq", name="conv.weight")
    with pytest.raises(ValueError, match="overflows"):
        codecs.encode(torch.tensor([1e6]), "fp16")
    with pytest.raises(TypeError, match="floating-point"):
        codecs.encode(torch.ones(4, dtype=torch.int64), "fp16")
    with pytest.raises(ValueError, match="already registered"):
        codecs.register_codec("fp16")(lambda w: w)


# ---------------------------------------------------------------- a whole Cognate model

def _plan(name: str, w: torch.Tensor) -> tuple[str, dict, bool]:
    """A mixed assignment: every codec appears at least once."""
    if w.dim() == 1 or "step_embed" in name or "halt" in name or "gates" in name:
        return "fp32", {}, False
    if "embed_tokens" in name or "lm_head" in name:
        return "int8", {}, False
    if "mlp.up_proj" in name:
        return "int8", {}, True  # pruned below
    if "mlp" in name:
        return "seedlm", SEEDLM, False
    if "q_proj" in name and "layers.0" in name:
        return "vptq", {"centroids": 16, "kiter": 10}, False
    if "attn" in name:
        return "int4", {"group_size": 16}, False
    return "fp16", {}, False


@pytest.fixture(scope="module")
def cognate_package(tmp_path_factory):
    model = tiny_cognate(seed=1, memory_enabled=True)
    with torch.no_grad():
        model.model.memory.o_proj.weight.normal_(0, 0.05)  # let the memory contribute
        for layer in (*model.model.layers, model.model.act.block):
            layer.mlp.up_proj.weight.copy_(_pruned(layer.mlp.up_proj.weight, 0.6))
    tok_dir = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save(tok_dir, model_max_length=256)
    stored = {}
    for name, w in model.state_dict().items():
        codec, settings, sparse = _plan(name, w)
        stored[name] = codecs.encode(w, codec, settings, sparse=sparse, name=name)
    out = tmp_path_factory.mktemp("cognate") / "compressed"
    info = package.save_compressed(out, stored, hf_config=model.config.to_dict(), copy_files_from=tok_dir,
                                   manifest={"phase": "compression"})
    return model, stored, out, info


def test_a_cognate_model_with_mixed_codecs_loads_with_the_decompressed_weights(cognate_package):
    model, stored, out, info = cognate_package
    assert {e["codec"] for e in info["parameters"].values()} == {"fp32", "fp16", "int8", "int4", "seedlm", "vptq"}
    assert sum(e["sparse"] for e in info["parameters"].values()) == 2
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(info["copied_files"]) <= set(info["files"])
    loaded = package.load_model(out)
    assert isinstance(loaded, CognateForCausalLM) and not loaded.training
    reference = tiny_cognate(seed=7, memory_enabled=True)  # other random init, then the weights
    reference.load_state_dict({k: s.decompress() for k, s in stored.items()}, strict=True)
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, orig = loaded(input_ids=x).logits, reference(input_ids=x).logits, model(input_ids=x).logits
    assert torch.equal(got, want)
    assert 0 < float((got - orig).abs().max()) < 0.5 * float(orig.abs().max())  # lossy, but close
    state = package.load_state_dict(out)
    for name, s in stored.items():
        assert torch.equal(state[name], s.decompress()), name
    assert info["totals"]["bits_per_weight"] < 16


def test_tied_embeddings_are_stored_once_and_filled_on_load(tmp_path):
    model = tiny_cognate(tie_word_embeddings=True)
    sd = model.state_dict()
    emb = codecs.encode(sd["model.embed_tokens.weight"], "int8")
    stored = {k: emb if k == "lm_head.weight" else codecs.encode(v, "fp16") for k, v in sd.items()}
    stored["model.embed_tokens.weight"] = emb
    info = package.save_compressed(tmp_path / "tied", stored, hf_config=model.config.to_dict())
    assert info["parameters"]["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    loaded = package.load_model(tmp_path / "tied")
    assert torch.equal(loaded.lm_head.weight, emb.decompress())
    del stored["lm_head.weight"]  # absent altogether: filled from its tied twin
    package.save_compressed(tmp_path / "untied", stored, hf_config=model.config.to_dict())
    assert torch.equal(package.load_model(tmp_path / "untied").lm_head.weight, emb.decompress())


# ---------------------------------------------------------------- bad packages

@pytest.fixture
def small_package(tmp_path):
    model = tiny_cognate()
    stored = {k: codecs.encode(v, "int8" if v.dim() == 2 else "fp32") for k, v in model.state_dict().items()}
    out = tmp_path / "pkg"
    package.save_compressed(out, stored, hf_config=model.config.to_dict())
    return out


def _edit_manifest(out, fn):
    path = out / package.MANIFEST_FILE
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_missing_files_are_artifact_errors_naming_the_file(small_package, tmp_path):
    with pytest.raises(ArtifactError, match="directory not found"):
        package.load_stored(tmp_path / "nowhere")
    (small_package / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json: file not found"):
        package.load_model(small_package)
    (small_package / package.TENSORS_FILE).unlink()
    with pytest.raises(ArtifactError, match="compressed.safetensors: file not found") as err:
        package.load_state_dict(small_package)
    assert err.value.path.endswith(package.TENSORS_FILE)
    (small_package / package.MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="compression.json: file not found"):
        package.load_state_dict(small_package)


def test_corrupt_files_are_artifact_errors_naming_the_file(small_package):
    path = small_package / package.TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="compressed.safetensors: sha256 mismatch"):
        package.load_state_dict(small_package)
    (small_package / package.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="compression.json: malformed JSON"):
        package.load_state_dict(small_package)
    (small_package / package.MANIFEST_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ArtifactError, match="not a compressed package"):
        package.load_state_dict(small_package)


def test_inconsistent_parameters_are_artifact_errors_naming_the_parameter(small_package):
    name = "model.layers.0.attn.q_proj.weight"
    _edit_manifest(small_package, lambda d: d["parameters"][name].update(format="zstd"))
    with pytest.raises(ArtifactError, match=f"parameter '{name}': unknown storage format 'zstd'"):
        package.load_state_dict(small_package)
    _edit_manifest(small_package, lambda d: d["parameters"][name].update(format="rtn", shape=[32, 48]))
    with pytest.raises(ArtifactError, match=f"compressed.safetensors: parameter '{name}': tensor field 'codes'"):
        package.load_state_dict(small_package)
    _edit_manifest(small_package, lambda d: d["parameters"][name].update(shape=[32, 32], codec="x",
                                                                         settings={"bits": 8}))
    with pytest.raises(ArtifactError, match=f"parameter '{name}': meta field 'group_size'"):
        package.load_state_dict(small_package)


def test_a_config_that_disagrees_with_the_weights_names_the_parameter(small_package):
    cfg = json.loads((small_package / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (small_package / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"parameter 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        package.load_model(small_package)
    cfg["num_hidden_layers"] = 3
    (small_package / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"missing \['model\.layers\.1\."):
        package.load_model(small_package)
