"""BitNet b1.58's quantizers and BitLinear, exactly as in the reference code (the unilm
"Training Tips, Code and FAQ" PDF, identical in HF transformers' ``integrations/bitnet.py`` and
tiiuae/onebitllms; ``../shared/reference/notes-algorithms.md`` section 1):

    weight_quant(w):     s = 1 / mean(|w|).clamp(min=1e-5)              (absmean, per tensor)
                         w_q = round(w * s).clamp(-1, 1) / s            (ternary times gamma = mean|w|)
    activation_quant(x): s = 127 / max(|x|, dim=-1).clamp(min=1e-5)     (absmax, per token)
                         x_q = round(x * s).clamp(-128, 127) / s        (int8, symmetric)

Training keeps latent full-precision weights; every forward quantizes both operands and the
straight-through estimator passes the gradient through the rounding unchanged
(``x + (q(x) - x).detach()``). (torchao's ``1bit.py`` copy of these formulas is wrong, per the
notes; these are not taken from it.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EPS", "weight_quant", "activation_quant", "ternary_codes", "ste", "BitLinear", "replace_linears"]

EPS = 1e-5  # the reference's clamp on the scales' denominators


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary quantization of a whole tensor: values in {-gamma, 0, +gamma}, gamma =
    mean(|w|) (at least 1e-5). Same shape and dtype."""
    scale = 1.0 / w.abs().mean().clamp(min=EPS)
    return (w * scale).round().clamp(-1, 1) / scale


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_quant``'s factors: ``(codes int8 in {-1, 0, 1}, gamma 0-d float32)`` with
    ``codes * gamma == weight_quant(w)`` (up to the float rounding of ``/ (1/gamma)``)."""
    gamma = w.detach().float().abs().mean().clamp(min=EPS)
    codes = (w.detach().float() / gamma).round().clamp(-1, 1).to(torch.int8)
    return codes, gamma


def activation_quant(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Absmax quantization per token (the last dim) to signed ``bits``-bit integers, symmetric,
    no zero point (8 bits: scale 127, range [-128, 127]). Same shape and dtype.

    Raises:
        ValueError: bits outside [2, 16].
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    q = 2 ** (bits - 1)
    scale = (q - 1) / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-q, q - 1) / scale


def ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``quantized``, the gradient of ``x``."""
    return x + (quantized - x).detach()


class BitLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ternary weights and 8-bit activations, trained through
    the STE (the latent weights stay full precision). No norm inside: place norms in the model
    (SubLN for Cognate, as the notes describe); HF transformers and onebitllms do the same.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation_bits: int = 8,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation_bits = activation_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = ste(x, activation_quant(x, self.activation_bits))
        w_q = ste(self.weight, weight_quant(self.weight))
        return F.linear(x_q, w_q, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activation_bits: int = 8) -> BitLinear:
        """A BitLinear holding a copy of ``linear``'s weights (and bias) as its latent weights."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  activation_bits=activation_bits, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights=ternary, activation_bits={self.activation_bits}"


def replace_linears(model: nn.Module, *, keep: Iterable[str] = ("lm_head",), activation_bits: int = 8) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` in place by a ``BitLinear`` with its weights,
    except those whose qualified name is in ``keep`` or ends with ``.`` + an entry of it (the
    LM head by default; embeddings are not Linear and always stay). A tied LM head stays tied
    to the embedding because it is kept.

    Returns:
        The qualified names of the replaced layers, in module order.
    Raises:
        ValueError: the model has no Linear layer to replace.
    """
    keep = tuple(keep)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(full == k or full.endswith("." + k) for k in keep):
                setattr(module, child_name, BitLinear.from_linear(child, activation_bits=activation_bits))
                replaced.append(full)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to replace (kept: {', '.join(keep)})")
    return replaced
