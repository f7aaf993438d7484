"""BitNet b1.58 building blocks (phases/bitnet/): the quantizers against golden values from the
formulas in the notes, the straight-through estimator's gradients, BitLinear and
replace_linears on real models, and lossless packing (property tests on odd shapes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phases.bitnet.packing import FORMATS, bits_per_weight, decode_table, pack, packed_bytes, unpack
from phases.bitnet.quant import BitLinear, activation_quant, replace_linears, ternary_codes, weight_quant


def test_weight_quant_golden_values():
    w = torch.tensor([[0.4, -0.2, 0.0], [1.2, -0.9, 0.1]])
    gamma = w.abs().mean()  # 2.8 / 6
    assert float(gamma) == pytest.approx(2.8 / 6)
    # w / gamma = [0.857, -0.429, 0, 2.571, -1.929, 0.214] -> round, clip -> [1, 0, 0, 1, -1, 0]
    expected = torch.tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 0.0]]) * gamma
    torch.testing.assert_close(weight_quant(w), expected)
    codes, g = ternary_codes(w)
    assert codes.tolist() == [[1, 0, 0], [1, -1, 0]] and float(g) == pytest.approx(float(gamma))
    tiny = torch.full((2, 2), 1e-9)  # the scale's clamp: 1 / max(mean|w|, 1e-5)
    assert torch.equal(weight_quant(tiny), torch.zeros(2, 2))


def test_activation_quant_golden_values_per_token():
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.01, -0.02]])
    # token 0: s = 127 / 1.0; 0.5 * 127 = 63.5 -> 64 (round half to even: 64), 0.25 * 127 = 31.75 -> 32
    # token 1: s = 127 / 2.0; 0.01 * 63.5 = 0.635 -> 1, -0.02 * 63.5 = -1.27 -> -1
    expected = torch.tensor([[64 / 127, -1.0, 32 / 127], [2.0, 1 / 63.5, -1 / 63.5]])
    torch.testing.assert_close(activation_quant(x), expected)
    assert torch.equal(activation_quant(torch.zeros(1, 3)), torch.zeros(1, 3))  # clamp: no division by 0
    q = activation_quant(torch.randn(4, 16), bits=4)  # at most 16 levels per token
    assert all(len(set(row.tolist())) <= 16 for row in q)
    with pytest.raises(ValueError, match="bits"):
        activation_quant(x, bits=1)


def test_gradients_flow_through_the_straight_through_estimator():
    torch.manual_seed(0)
    layer = BitLinear(6, 3, bias=True)
    x = torch.randn(5, 6, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(activation_quant(x), weight_quant(layer.weight), layer.bias)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    y.backward(g)
    # STE: the gradient is that of F.linear with the quantized operands, passed to the latent ones
    torch.testing.assert_close(layer.weight.grad, g.T @ activation_quant(x.detach()))
    torch.testing.assert_close(x.grad, g @ weight_quant(layer.weight.detach()))
    assert layer.weight.grad.abs().sum() > 0


def test_replace_linears_keeps_the_head_and_embeddings():
    from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig

    torch.manual_seed(0)
    model = CognateForCausalLM(CognateModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=2, num_attention_heads=2))
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    x = torch.randint(0, 64, (2, 8))
    before = model(input_ids=x).logits
    replaced = replace_linears(model)
    assert "lm_head" not in replaced and len(replaced) == n_linear - 1
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    after = model(input_ids=x).logits
    assert after.shape == before.shape and not torch.equal(after, before)  # quantized forward
    after.sum().backward()
    used = [n for n in replaced if ".memory." not in n]  # the memory is off in this model
    assert used and all(model.get_submodule(n).weight.grad.abs().sum() > 0 for n in used)
    with pytest.raises(ValueError, match="no nn.Linear"):
        replace_linears(torch.nn.Sequential(torch.nn.ReLU()))


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 13), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       fmt=st.sampled_from(FORMATS))
def test_pack_unpack_is_lossless_on_odd_shapes(shape, seed, fmt):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack(codes, fmt)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(codes.numel(), fmt)
    assert torch.equal(unpack(packed, codes.numel(), fmt).reshape(shape), codes)
    decoded = decode_table(fmt)[packed.long()].reshape(-1)[:codes.numel()]  # the inference path's decoder
    assert torch.equal(decoded.to(torch.int8).reshape(shape), codes)


def test_packed_sizes_and_bad_input():
    assert bits_per_weight("2bit") == 2.0 and bits_per_weight("base3") == 1.6
    codes = torch.tensor([-1, 0, 1, 1, 0])
    assert pack(codes, "2bit").tolist() == [0b00011010, 0b01010101]  # digits 0,1,2,2 | 1 + padding 1,1,1
    assert packed_bytes(1000, "2bit") == 250 and packed_bytes(1000, "base3") == 200
    with pytest.raises(ValueError, match="format"):
        pack(codes, "3bit")
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack(torch.tensor([2]), "2bit")
    with pytest.raises(ValueError, match="code 3"):
        unpack(torch.tensor([0xFF], dtype=torch.uint8), 4, "2bit")
    with pytest.raises(ValueError, match="need 2"):
        unpack(torch.zeros(1, dtype=torch.uint8), 5, "2bit")


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_layer_equals_bitlinear_and_the_file_round_trips_bit_exact(fmt, tmp_path):
    from phases.bitnet.packed import PackedBitLinear, load_packed, save_packed
    from phases.cognate.modeling import CognateForCausalLM, CognateModelConfig

    torch.manual_seed(0)
    layer = BitLinear(37, 11, bias=True).eval()  # odd shapes: the last byte is padded
    packed = PackedBitLinear.from_bitlinear(layer, fmt)
    x = torch.randn(3, 5, 37)
    torch.testing.assert_close(packed(x), layer(x), atol=1e-5, rtol=1e-5)
    codes, gamma = ternary_codes(layer.weight)
    assert torch.equal(packed.codes(), codes) and float(packed.gamma) == float(gamma)
    assert packed.packed.numel() == packed_bytes(37 * 11, fmt)

    model = CognateForCausalLM(CognateModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=2, num_attention_heads=2)).eval()
    replace_linears(model)
    ids = torch.randint(0, 64, (2, 9))
    expected = model(input_ids=ids).logits
    quantized = {n: ternary_codes(m.weight) for n, m in model.named_modules() if isinstance(m, BitLinear)}
    out = save_packed(model, tmp_path / "m", fmt)
    loaded = load_packed(out)
    for name, (codes, gamma) in quantized.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, PackedBitLinear)
        assert torch.equal(layer.codes(), codes) and float(layer.gamma) == float(gamma)  # bit-exact
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, BitLinear) for m in loaded.modules())
    (out / "bitnet.safetensors").write_bytes(b"\0" * 32)
    from coordinator.errors import ArtifactError

    with pytest.raises(ArtifactError):
        load_packed(out)
