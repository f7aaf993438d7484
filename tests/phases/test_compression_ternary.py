"""Phase 8's ternary codec (BitNet b1.58): trit packing is lossless at five trits per byte, a
BitNet layer's ternary weights decompress bit for bit at exactly the counted bits, other weights
are absmean-quantised to {-s, 0, s} per row, and the codec round-trips through the package."""

from __future__ import annotations

import json
import math

import pytest
import torch

from coordinator.errors import ArtifactError
from phases.compression import codecs, package, ternary
from phases.compression.sparse import SparseTensor
from phases.compression.ternary import TernaryTensor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bitnet(rows: int, cols: int, *, seed: int = 0, per_row: bool = True) -> torch.Tensor:
    """W = s * T as a BitNet b1.58 layer holds it: trits times a (per-row or per-tensor) scale."""
    t = torch.randint(-1, 2, (rows, cols), generator=_gen(seed)).float()
    s = torch.rand(rows if per_row else 1, 1, generator=_gen(seed + 1)) * 0.1 + 0.01
    return t * s


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 9, 10, 1001])
def test_trit_packing_round_trips_with_five_trits_per_byte(n):
    t = torch.randint(-1, 2, (n,), generator=_gen(n), dtype=torch.int8)
    packed = ternary.pack_trits(t)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 5)
    assert packed.numel() == 0 or int(packed.max()) < 243
    assert torch.equal(ternary.unpack_trits(packed, n), t)


def test_trit_packing_golden_bytes_and_checks():
    # digits T + 1, first trit most significant: [2, 1, 0, 2, 1] and [0, 1, 1, 1, 1] (padding: digit 1)
    packed = ternary.pack_trits(torch.tensor([1, 0, -1, 1, 0, -1], dtype=torch.int8))
    assert packed.tolist() == [2 * 81 + 1 * 27 + 0 * 9 + 2 * 3 + 1, 0 * 81 + 1 * 27 + 1 * 9 + 1 * 3 + 1]
    assert ternary.pack_trits(torch.ones(5, dtype=torch.int8)).tolist() == [242]
    with pytest.raises(ValueError, match="trits must be in"):
        ternary.pack_trits(torch.tensor([2]))
    with pytest.raises(ValueError, match="need 2 uint8 bytes"):
        ternary.unpack_trits(packed[:1], 6)
    with pytest.raises(ValueError, match="not five trits"):
        ternary.unpack_trits(torch.tensor([243], dtype=torch.uint8), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_bitnet_weight_is_ternary_and_decompresses_bit_exactly(dtype):
    w = _bitnet(64, 320).to(dtype)
    assert ternary.is_ternary(w) and not ternary.is_ternary(w, per_row=False)
    s = codecs.encode(w, "ternary")
    assert isinstance(s, TernaryTensor) and s.scales.dtype == torch.float32
    out = s.decompress()
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       w.view(torch.int16 if dtype != torch.float32 else torch.int32))  # bit for bit
    assert torch.equal(s.trits(), torch.sign(w).to(torch.int8))
    assert ternary.is_ternary(_bitnet(8, 16, per_row=False), per_row=False)


def test_bits_per_weight_of_a_64x320_weight_are_exact():
    s = ternary.compress(_bitnet(64, 320))
    assert s.total_bits == math.ceil(64 * 320 / 5) * 8 + 64 * 32
    assert s.bits_per_weight == (math.ceil(64 * 320 / 5) * 8 + 64 * 32) / (64 * 320) == 1.7
    assert s.nbytes == 4096 + 64 * 4
    half = ternary.compress(_bitnet(64, 320), scale_dtype="fp16")
    assert half.scales.dtype == torch.float16 and half.bits_per_weight == 1.65
    with pytest.raises(ValueError, match="scale_dtype must be one of 'fp32', 'fp16'"):
        ternary.compress(_bitnet(4, 5), scale_dtype="bf16")


def test_a_gaussian_weight_is_not_ternary_and_gets_absmean_trits_per_row():
    w = torch.randn(32, 96, generator=_gen(3))
    assert not ternary.is_ternary(w) and not ternary.is_ternary(w, per_row=False)
    s = ternary.compress(w)
    out = s.decompress()
    absmean = w.abs().mean(1)
    assert torch.equal(s.scales, absmean)
    for row, scale in zip(out, s.scales):
        assert set(row.unique().tolist()) <= {-float(scale), 0.0, float(scale)}
    assert torch.equal(s.trits(), torch.clamp(torch.round(w / absmean[:, None]), -1, 1).to(torch.int8))
    assert ternary.is_ternary(out)  # the reconstruction is ternary: compressing it again is exact
    assert torch.equal(ternary.compress(out).decompress(), out)
    err = float((out - w).norm() / w.norm())
    assert 0.3 < err < 0.6, err  # lossy, at the level ternary rounding of Gaussians gives


def test_is_ternary_edge_cases():
    assert ternary.is_ternary(torch.zeros(3, 4)) and ternary.is_ternary(torch.zeros(0, 4))
    assert ternary.is_ternary(torch.tensor(0.5)) and ternary.is_ternary(torch.tensor([0.0, -2.0, 2.0]))
    assert not ternary.is_ternary(torch.tensor([0.0, -2.0, 2.0001]))
    assert not ternary.is_ternary(torch.tensor([float("inf"), float("-inf")]))
    assert not ternary.is_ternary(torch.tensor([float("nan")]))
    mixed = torch.tensor([[1.0, -1.0], [0.5, 0.25]])
    assert not ternary.is_ternary(mixed)
    s = ternary.compress(mixed)  # row 0 exact, row 1 absmean
    assert s.decompress()[0].tolist() == [1.0, -1.0] and s.scales.tolist() == [1.0, 0.375]


@pytest.mark.parametrize("shape", [(), (1,), (7,), (64, 320), (5, 13), (3, 4, 11), (2, 0), (0,)])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
def test_planned_bits_equal_the_stored_bits(shape, scale_dtype):
    w = torch.randn(shape, generator=_gen(len(shape)))
    s = codecs.encode(w, "ternary", {"scale_dtype": scale_dtype})
    assert codecs.planned_bits(shape, "ternary", {"scale_dtype": scale_dtype}) == s.total_bits
    assert s.decompress().shape == w.shape and s.decompress().dtype == w.dtype
    if s.numel:
        assert torch.equal(ternary.compress(s.decompress(), scale_dtype=scale_dtype).decompress(), s.decompress())


def test_sparse_storage_of_a_pruned_ternary_weight_is_exact():
    # one scale for the whole tensor, as BitNet b1.58's absmean gives: the kept values are one row
    t = torch.randint(-1, 2, (64, 320), generator=_gen(4)).float()
    keep = torch.rand(64, 320, generator=_gen(5)) >= 0.6
    w = torch.where(keep, torch.where(t == 0, torch.ones_like(t), t), torch.zeros_like(t)) * 0.0371
    assert abs(float((w == 0).float().mean()) - 0.6) < 0.02
    s = codecs.encode(w, "ternary", sparse=True)
    assert isinstance(s, SparseTensor) and isinstance(s.values, TernaryTensor)
    assert s.total_bits < codecs.encode(w, "ternary").total_bits
    assert s.total_bits == w.numel() + math.ceil(s.nnz / 5) * 8 + 32
    assert torch.equal(s.decompress(), w)


def test_non_finite_or_non_float_weights_are_rejected():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            ternary.compress(torch.tensor([[1.0, bad]]))
        with pytest.raises(ValueError, match="NaN or infinite"):
            codecs.encode(torch.tensor([[1.0, bad]]), "ternary")
    with pytest.raises(TypeError, match="floating-point"):
        ternary.compress(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="overflows fp16"):
        ternary.compress(torch.tensor([1e6, -1e6]), scale_dtype="fp16")


# ---------------------------------------------------------------- the package

@pytest.fixture
def ternary_package(tmp_path):
    pruned = _bitnet(64, 320, seed=6, per_row=False) * (torch.rand(64, 320, generator=_gen(7)) >= 0.7)
    stored = {"bitnet.weight": codecs.encode(_bitnet(64, 320, seed=2), "ternary"),
              "half.weight": codecs.encode(_bitnet(12, 10, seed=3), "ternary", {"scale_dtype": "fp16"}),
              "conv.weight": codecs.encode(torch.randn(3, 4, 11, generator=_gen(4)), "ternary"),
              "pruned.weight": codecs.encode(pruned, "ternary", sparse=True)}
    assert isinstance(stored["pruned.weight"], SparseTensor)
    out = tmp_path / "pkg"
    info = package.save_compressed(out, stored, hf_config={"model_type": "none"})
    return stored, out, info


def test_ternary_weights_round_trip_through_the_package(ternary_package):
    stored, out, info = ternary_package
    loaded = package.load_stored(out)
    for name, s in stored.items():
        back = loaded[name]
        assert type(back) is type(s) and back.total_bits == s.total_bits, name
        assert torch.equal(back.decompress(), s.decompress()), name
        entry = info["parameters"][name]
        assert entry["codec"] == "ternary" and entry["total_bits"] == s.total_bits
    assert info["parameters"]["bitnet.weight"]["format"] == "ternary"
    assert info["parameters"]["half.weight"]["settings"] == {"scale_dtype": "fp16"}
    assert info["parameters"]["pruned.weight"]["inner"]["format"] == "ternary"
    assert loaded["bitnet.weight"].bits_per_weight == 1.7
    payload = sum(s.nbytes for s in stored.values())
    assert payload <= (out / package.TENSORS_FILE).stat().st_size <= payload + 64 * 1024


def test_a_short_packed_tensor_is_an_artifact_error_naming_the_field():
    s = ternary.compress(_bitnet(6, 10))
    meta, tensors = package.to_tensors(s)
    assert set(tensors) == {"codes", "scales"} and tensors["codes"].numel() == 12
    with pytest.raises(ArtifactError, match=r"parameter 'w': tensor field 'codes': 60 trits need 12 uint8"):
        package.from_tensors(meta, {**tensors, "codes": tensors["codes"][:-1]}, name="w")
    with pytest.raises(ArtifactError, match="tensor field 'codes': byte value 255"):
        package.from_tensors(meta, {**tensors, "codes": torch.full((12,), 255, dtype=torch.uint8)})
    with pytest.raises(ArtifactError, match=r"tensor field 'scales' is torch.float32 \(5,\)"):
        package.from_tensors(meta, {**tensors, "scales": tensors["scales"][:5]})
    with pytest.raises(ArtifactError, match="setting 'scale_dtype' must be one of"):
        package.from_tensors({**meta, "settings": {"scale_dtype": "int4"}}, tensors)


def test_a_corrupted_packed_tensor_on_disk_is_an_artifact_error(ternary_package, tmp_path):
    stored, out, _ = ternary_package
    short = {**stored, "bitnet.weight": TernaryTensor((64, 320), stored["bitnet.weight"].codes[:-1],
                                                       stored["bitnet.weight"].scales)}
    package.save_compressed(tmp_path / "bad", short, hf_config={"model_type": "none"})
    with pytest.raises(ArtifactError, match=r"compressed.safetensors: parameter 'bitnet.weight': tensor field "
                                            r"'codes': 20480 trits need 4096 uint8 bytes"):
        package.load_stored(tmp_path / "bad")
    # a manifest whose shape disagrees with the stored trits
    path = out / package.MANIFEST_FILE
    doc = json.loads(path.read_text())
    doc["parameters"]["half.weight"]["shape"] = [12, 11]
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="parameter 'half.weight': tensor field 'codes'"):
        package.load_state_dict(out)


def test_a_bitnet_like_model_gets_the_ternary_codec_and_an_ordinary_one_does_not(tmp_path):
    from safetensors.torch import save_file

    from coordinator.drivers.compress import with_ternary_codec
    from phases.compression.config import CompressConfig
    from phases.compression.ternary import ternary_share
    from tests.phases.tiny_cognate import tiny_cognate

    model = tiny_cognate()
    plain_share = ternary_share(dict(model.state_dict()))
    done = ternary.ternarize_linears(model)
    assert done and not any("lm_head" in n for n in done)
    share = ternary_share(dict(model.state_dict()))
    assert plain_share < 0.1 and 0.5 <= share < 1.0, (plain_share, share)  # embeddings are not ternary

    cfg = CompressConfig(strategy="quantization", codecs=["int8"])
    bitnet_dir, plain_dir = tmp_path / "bitnet", tmp_path / "plain"
    for d, m in ((bitnet_dir, model), (plain_dir, tiny_cognate())):
        d.mkdir()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    assert with_ternary_codec(cfg, bitnet_dir).codecs == ("ternary", "int8")
    assert with_ternary_codec(cfg, plain_dir).codecs == ("int8",)
    assert with_ternary_codec(cfg.model_copy(update={"strategy": "pruning"}), bitnet_dir).codecs == ("int8",)
    # the ternary matrices are stored losslessly
    for name, w in model.state_dict().items():
        if w.dim() == 2 and w.numel() >= 256 and ternary.is_ternary(w):
            assert torch.equal(codecs.encode(w, "ternary").decompress(), w), name
