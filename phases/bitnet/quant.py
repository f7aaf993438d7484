"""BitNet b1.58's quantizers and BitLinear, exactly as in the reference code (the unilm
"Training Tips, Code and FAQ" PDF, identical in HF transformers' ``integrations/bitnet.py`` and
tiiuae/onebitllms; ``../shared/reference/notes-algorithms.md`` section 1):

    weight_quant(w):     s = 1 / mean(|w|).clamp(min=1e-5)              (absmean, per tensor)
                         w_q = round(w * s).clamp(-1, 1) / s            (ternary times gamma = mean|w|)
    activation_quant(x): s = 127 / max(|x|, dim=-1).clamp(min=1e-5)     (absmax, per token)
                         x_q = round(x * s).clamp(-128, 127) / s        (int8, symmetric)

With a per-layer sparsity threshold ``t`` (chosen by calibration, ``calibrate.py``, when the
config enables it) the weight quantizer becomes Ternary Weight Networks' form (Li et al. 2016,
arXiv 1605.04711): code = sign(w) where |w| > t * mean|w|, else 0; scale = mean |w| over the
nonzero codes (the scale that minimises ||w - scale * codes||^2 for that support). ``t = None``
is the exact BitNet quantizer above (whose support is |w| > 0.5 * mean|w|, its scale mean|w|).

Training keeps latent full-precision weights; every forward quantizes both operands and the
straight-through estimator passes the gradient through the rounding unchanged
(``x + (q(x) - x).detach()``). (torchao's ``1bit.py`` copy of these formulas is wrong, per the
notes; these are not taken from it.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EPS", "weight_quant", "activation_quant", "ternary_codes", "ternary_linear", "ste", "BitLinear", "kept",
           "replace_linears"]

EPS = 1e-5  # the reference's clamp on the scales' denominators


def _codes_and_scale(w: torch.Tensor, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as w's float dtype in {-1, 0, 1}, scale 0-d); see the module docstring."""
    gamma = w.abs().mean().clamp(min=EPS)
    if threshold is None:
        scale = 1.0 / gamma
        return (w * scale).round().clamp(-1, 1), 1.0 / scale
    support = w.abs() > threshold * gamma
    codes = torch.sign(w) * support
    kept = support.sum()
    scale = torch.where(kept > 0, (w.abs() * support).sum() / kept.clamp(min=1), gamma).clamp(min=EPS)
    return codes, scale


def weight_quant(w: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Ternary quantization of a whole tensor: values in {-scale, 0, +scale}. ``threshold`` None:
    BitNet's absmean (scale = mean|w|, at least 1e-5); else the TWN form with that threshold
    (module docstring). Same shape and dtype."""
    if threshold is None:
        scale = 1.0 / w.abs().mean().clamp(min=EPS)
        return (w * scale).round().clamp(-1, 1) / scale
    codes, scale = _codes_and_scale(w, threshold)
    return codes * scale


def ternary_codes(w: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_quant``'s factors: ``(codes int8 in {-1, 0, 1}, scale 0-d float32)`` with
    ``codes * scale == weight_quant(w, threshold)`` (up to the float rounding of ``/ (1/scale)``)."""
    codes, scale = _codes_and_scale(w.detach().float(), threshold)
    return codes.to(torch.int8), scale


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


def ternary_linear(x: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor | None, *,
                   product: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Inference form of a ternary layer: ``x`` quantized to 8 bits per token (absmax), then
    ``y = (x_int @ codes^T) * scale / s_x + bias``. The integer products run as a float32
    matmul, exact while sums stay below 2^24 (127 * in_features < 2^24: in_features up to
    132,000). ``codes`` (out, in) float in {-1, 0, 1}; ``scale`` 0-d. Used by ``BitLinear`` in
    eval mode and by ``PackedBitLinear``, so a packed model reproduces the QAT model exactly.
    ``product``, when given, computes ``x_int @ codes^T`` instead (an exact integer kernel)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).float()
    # in place where the value is ours: one (M, in) and one (M, out) temporary, not five
    absmax = torch.linalg.vector_norm(flat, float("inf"), dim=-1, keepdim=True)  # max |x| per token
    s_x = 127.0 / absmax.clamp_(min=EPS)  # (M, 1)
    x_int = (flat * s_x).round_().clamp_(-128, 127)  # integers, kept as float32
    y = x_int @ codes.T if product is None else product(x_int)
    del x_int
    y.mul_(scale / s_x)
    if bias is not None:
        y.add_(bias)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


class BitLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ternary weights and 8-bit activations, trained through
    the STE (the latent weights stay full precision). In eval mode it computes exactly as the
    packed layer does (``ternary_linear``), with no gradient to the weights: train in train mode.
    No norm inside: place norms in the model (SubLN for Cognate, as the notes describe); HF
    transformers and onebitllms do the same.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation_bits: int = 8,
                 threshold: float | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation_bits = activation_bits
        self.threshold = threshold  # sparsity threshold / mean|w|; None: BitNet's absmean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.activation_bits == 8:  # the packed model's arithmetic, exactly
            codes, scale = _codes_and_scale(self.weight.detach().float(), self.threshold)
            return ternary_linear(x, codes, scale, None if self.bias is None else self.bias.detach().float())
        x_q = ste(x, activation_quant(x, self.activation_bits))
        w_q = ste(self.weight, weight_quant(self.weight, self.threshold))
        return F.linear(x_q, w_q, self.bias)

    def quantized_weight(self) -> torch.Tensor:
        """The ternary weight the forward uses (codes times scale), detached."""
        return weight_quant(self.weight.detach(), self.threshold)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activation_bits: int = 8, threshold: float | None = None) -> BitLinear:
        """A BitLinear holding a copy of ``linear``'s weights (and bias) as its latent weights."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  activation_bits=activation_bits, threshold=threshold, device=linear.weight.device,
                  dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weights=ternary, activation_bits={self.activation_bits}, "
                f"threshold={self.threshold}")


def kept(name: str, keep: Iterable[str]) -> bool:
    """Whether the layer ``name`` matches an entry of ``keep``: equal, or ending in ``.`` + it."""
    return any(name == k or name.endswith("." + k) for k in keep)


def replace_linears(model: nn.Module, *, keep: Iterable[str] = ("lm_head",), activation_bits: int = 8,
                    thresholds: dict[str, float] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` in place by a ``BitLinear`` with its weights,
    except those whose qualified name is in ``keep`` or ends with ``.`` + an entry of it (the
    LM head by default; embeddings are not Linear and always stay). A tied LM head stays tied
    to the embedding because it is kept. ``thresholds`` gives layers their sparsity threshold
    (``calibrate.choose_thresholds``); the others use BitNet's absmean.

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
            if type(child) is nn.Linear and not kept(full, keep):
                setattr(module, child_name, BitLinear.from_linear(
                    child, activation_bits=activation_bits, threshold=(thresholds or {}).get(full)))
                replaced.append(full)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to replace (kept: {', '.join(keep)})")
    return replaced
