"""Inference from packed ternary weights, and the packed model file.

``PackedBitLinear`` holds a layer's ternary codes packed (``packing.py``: 2 or 1.6 bits per
weight) and its scale gamma. Each forward decodes only this layer's codes, in tiles of output
rows of at most ``TILE_WEIGHTS`` weights, with one table lookup per byte
(``packing.decode_table``: 256 entries of 4 or 5 codes), quantizes the activations to 8 bits
per token (absmax, as in training) and multiplies (``quant.ternary_linear``):

    y = (x_int @ codes^T) * gamma / s_x + bias

The integer products run as float32 matmuls, exact (sums of at most 127 * in_features < 2^24
for in_features up to 132,000): on CPU ``torch._int_mm`` measured 45x slower than the float
matmul of the same shape (1376 x 512 x 512, torch 2.13, one thread), so it is not used. The
model never holds all its float weights: at rest it is the packed bytes, and at most one tile
of decoded codes exists at a time. ``BitLinear`` in eval mode runs the same arithmetic, so a
packed model gives exactly the QAT model's outputs. (CPU; a model moved to CUDA runs the
``decode`` kernel there.)

Kernels (``kernel=``): ``"decode"`` (the default) as above: at rest 1.6 or 2 bits per weight.
``"int8"``: the codes are decoded once, at load, into an int8 weight prepacked for fbgemm's int8
GEMM (``torch.ops.quantized.linear_dynamic``, x86), and each forward multiplies the 8-bit
activations by it with int32 accumulation: measured about 2x faster than the float32 matmul of
the same shape, at 8 bits per weight in memory (CPU only). The activations are handed over as exact
integers: one extra row holding -128 and 127 pins the kernel's dynamic range to 255 (scale 1,
zero point 128) and ``reduce_range`` is off, which is safe here because products with ternary
weights cannot saturate its 16-bit pair sums. Both kernels give bit-identical outputs. The
``torch.ao`` quantized ops are deprecated in torch 2.13 in favour of torchao, whose CPU int8 path
(``torch._int_mm``) measured 45x slower: replace this when torchao has an x86 int8 GEMM.

``save_packed`` writes an HF config plus ``bitnet.safetensors`` (packed codes, scales, and
every other tensor in full precision) and ``bitnet.json`` (format, packed layers, shapes);
``load_packed`` rebuilds the model from them, the ternary weights bit-exact.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.errors import ArtifactError
from phases.bitnet.packing import FORMATS, check, decode_table, pack, packed_bytes, unpack, weights_per_byte
from phases.bitnet.quant import BitLinear, ternary_codes, ternary_linear

__all__ = ["KERNELS", "PACKED_FILE", "PACKED_META", "PackedBitLinear", "int8_kernel_available", "pack_model",
           "save_packed", "load_packed"]

PACKED_FILE = "bitnet.safetensors"
PACKED_META = "bitnet.json"
_FORMAT = 1
KERNELS = ("decode", "int8")
# The decode kernel decodes a layer in tiles of output rows holding at most this many weights
# (1 MiB of float32), so its transient memory does not grow with the layer.
TILE_WEIGHTS = 1 << 18


def int8_kernel_available() -> bool:
    """Whether this torch build has the fbgemm int8 GEMM the ``"int8"`` kernel needs (x86)."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def _prepack_int8(codes: torch.Tensor) -> Any:
    """fbgemm's prepacked int8 weight of ternary ``codes`` (out, in), scale 1, zero point 0."""
    import warnings

    with warnings.catch_warnings():  # torch.ao quantized tensors are deprecated (module docstring)
        warnings.simplefilter("ignore", UserWarning)
        weight = torch.quantize_per_tensor(codes.float(), 1.0, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(weight, None)


def _int8_product(x_int: torch.Tensor, prepacked: Any) -> torch.Tensor:
    """``x_int @ codes^T`` exactly, by the int8 GEMM (module docstring: the range row)."""
    edge = x_int.new_zeros(1, x_int.shape[1])
    edge[0, 0], edge[0, -1] = -128.0, 127.0
    return torch.ops.quantized.linear_dynamic(torch.cat([x_int, edge]), prepacked, False)[:x_int.shape[0]]


class PackedBitLinear(nn.Module):
    """A ternary linear layer stored packed; see the module docstring."""

    def __init__(self, packed: torch.Tensor, gamma: torch.Tensor, shape: tuple[int, int], fmt: str,
                 bias: torch.Tensor | None = None, activation_bits: int = 8, kernel: str = "decode"):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if kernel == "int8" and not int8_kernel_available():
            raise ValueError("kernel 'int8' needs torch's fbgemm int8 GEMM (x86 builds); use kernel 'decode'")
        out_features, in_features = shape
        if packed.numel() != packed_bytes(out_features * in_features, fmt):
            raise ValueError(f"{packed.numel()} packed bytes do not hold a {out_features}x{in_features} weight "
                             f"in format {fmt!r}")
        if activation_bits != 8:
            raise ValueError("packed inference takes 8-bit activations (int8 products)")
        self.out_features, self.in_features, self.fmt = out_features, in_features, fmt
        packed = packed.to(torch.uint8).reshape(-1)
        check(packed, out_features * in_features, fmt)
        self.register_buffer("packed", packed)
        self.register_buffer("table", decode_table(fmt), persistent=False)
        self.register_buffer("gamma", gamma.detach().float().reshape(()))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.kernel = kernel
        # not a buffer: derived from `packed` at construction, never saved
        self._int8 = _prepack_int8(self.codes()) if kernel == "int8" and in_features >= 2 else None

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, fmt: str) -> PackedBitLinear:
        codes, gamma = ternary_codes(layer.weight, layer.threshold)
        return cls(pack(codes, fmt), gamma, (layer.out_features, layer.in_features), fmt,
                   None if layer.bias is None else layer.bias, layer.activation_bits)

    def codes(self) -> torch.Tensor:
        """The ternary codes (out, in) int8."""
        return unpack(self.packed, self.out_features * self.in_features, self.fmt).reshape(
            self.out_features, self.in_features).to(self.packed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8 is not None:
            return ternary_linear(x, None, self.gamma, self.bias, product=lambda xi: _int8_product(xi, self._int8))
        rows = max(1, TILE_WEIGHTS // self.in_features)
        if rows >= self.out_features:
            return ternary_linear(x, self._decoded_rows(0, self.out_features), self.gamma, self.bias)

        def tiled(x_int: torch.Tensor) -> torch.Tensor:  # at most one tile of decoded codes at a time
            y = x_int.new_empty(x_int.shape[0], self.out_features)
            for r0 in range(0, self.out_features, rows):
                r1 = min(r0 + rows, self.out_features)
                y[:, r0:r1] = x_int @ self._decoded_rows(r0, r1).T
            return y

        return ternary_linear(x, None, self.gamma, self.bias, product=tiled)

    def _decoded_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Output rows [r0, r1) of the codes as float32 (r1 - r0, in), decoding only their bytes.
        ``index_select``, not ``table[packed.long()]``: 4x faster on CPU (0.86 vs 3.4 ms for a
        1376 x 512 base-3 layer, one thread, torch 2.13)."""
        per = weights_per_byte(self.fmt)
        start, stop = r0 * self.in_features, r1 * self.in_features
        b0, b1 = start // per, -(-stop // per)
        flat = self.table.index_select(0, self.packed[b0:b1].int()).reshape(-1)
        return flat[start - b0 * per:stop - b0 * per].reshape(r1 - r0, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"kernel={self.kernel}")


def pack_model(model: nn.Module, fmt: str) -> list[str]:
    """Replace every ``BitLinear`` of ``model`` in place by a ``PackedBitLinear``; returns their names."""
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                setattr(module, child_name, PackedBitLinear.from_bitlinear(child, fmt))
                names.append(f"{name}.{child_name}" if name else child_name)
    return names


def save_packed(model: nn.Module, out_dir: str | Path, fmt: str, tokenizer: Any = None) -> Path:
    """Write ``model`` (its BitLinear layers, or already packed ones) as a packed model dir,
    atomically (temp dir, then rename). The model is packed in place. Returns ``out_dir``."""
    from serialization.checkpoint import atomic_write_json, publish_dir, save_tensors, staging_dir

    pack_model(model, fmt)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedBitLinear)}
    if not packed:
        raise ValueError(f"{type(model).__name__} has no BitLinear layer to pack")
    tmp = staging_dir(out_dir)
    tmp.mkdir()
    model.config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sha = save_tensors(tmp / PACKED_FILE, tensors)
    atomic_write_json(tmp / PACKED_META, {
        "format": _FORMAT, "packing": fmt, "tensors": PACKED_FILE, "sha256": sha,
        "layers": {n: {"shape": [m.out_features, m.in_features], "bias": m.bias is not None}
                   for n, m in packed.items()}})
    return publish_dir(tmp, out_dir)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside live on the meta device (no memory, no init compute); buffers
    stay real, computed by their modules' constructors (e.g. Llama's rotary ``inv_freq``, which
    is not saved). What ``accelerate.init_empty_weights(include_buffers=False)`` does, by the same
    patch of ``nn.Module.register_parameter``; accelerate is not a dependency. A plain
    ``torch.device("meta")`` would leave such buffers empty."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_packed(model_dir: str | Path, *, kernel: str = "decode") -> nn.Module:
    """Rebuild a model written by ``save_packed``: its config, packed layers and other tensors;
    its packed layers compute with ``kernel`` (module docstring).

    Raises:
        ArtifactError: the meta file or the tensors are missing, altered or do not fit the config.
    """
    import phases.cognate.modeling  # noqa: F401 - registers the Cognate classes with the Auto API
    from transformers import AutoConfig, AutoModelForCausalLM

    from serialization.checkpoint import load_tensors, read_json

    model_dir = Path(model_dir)
    meta_path = model_dir / PACKED_META
    if not meta_path.is_file():
        raise ArtifactError(str(meta_path), "not a packed BitNet model dir (no bitnet.json)")
    meta = read_json(meta_path)
    try:
        fmt, layers, name, sha = meta["packing"], meta["layers"], meta["tensors"], meta["sha256"]
    except (KeyError, TypeError) as err:
        raise ArtifactError(str(meta_path), f"malformed: missing {err}") from None
    tensors = load_tensors(model_dir / Path(name).name, expected_sha256=sha)
    with _parameters_on_meta():  # no float weights are allocated: the stored tensors are assigned below
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    try:
        for layer, info in layers.items():
            parent, _, child = layer.rpartition(".")
            module = PackedBitLinear(tensors[f"{layer}.packed"], tensors[f"{layer}.gamma"], tuple(info["shape"]), fmt,
                                     tensors.get(f"{layer}.bias") if info["bias"] else None, kernel=kernel)
            setattr(model.get_submodule(parent) if parent else model, child, module)
        model.load_state_dict(tensors, strict=True, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    except (KeyError, ValueError, RuntimeError, AttributeError) as err:
        raise ArtifactError(str(model_dir / name), f"does not fit the config: {err}") from None
    if leftover:
        raise ArtifactError(str(model_dir / name), f"holds no values for {', '.join(leftover[:5])}")
    return model.eval()
