"""Calibration: activation statistics of the layers to quantize, SubLN gains from them, and
per-layer sparsity thresholds chosen on them.

``collect`` runs calibration windows through the full-precision input model with forward hooks
on the chosen ``nn.Linear`` layers and records, per layer, statistics of its input: the number
of token rows seen, absmax (the largest |x|), the mean per-token absmax (what 8-bit absmax
quantization scales by), the mean per-token RMS, the mean |x|, and a deterministic subsample of
input rows (at most ``rows``, evenly strided over all rows seen) for the threshold search. A
layer called several times per forward (Cognate's pondered block) counts every call.

``choose_thresholds`` picks, for each layer, the grid value ``t`` whose ternary weight
(``quant.weight_quant(w, t)``) minimises the relative output error on the kept input rows,
``||X (W - Q_t(W))^T||^2 / ||X W^T||^2``: an activation-aware choice, as GPTQ and AWQ judge
quantized layers by their outputs rather than their weights. BitNet's absmean (``t = None``) is
scored too and reported beside it.

``add_sub_norm`` rebuilds a Cognate model with SubLN (``CognateModelConfig.sub_norm``) and sets
each new norm's gain to the mean per-token RMS that calibration measured at its input: for
tokens at typical scale, ``RMSNorm(x) * gain`` is then close to ``x``, so the model starts
close to its input instead of with every residual branch rescaled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from coordinator.errors import PhaseError
from phases.bitnet.quant import kept, weight_quant

__all__ = ["LayerStats", "target_layers", "collect", "choose_thresholds", "add_sub_norm"]


@dataclass
class LayerStats:
    """One layer's input statistics (module docstring)."""

    tokens: int = 0
    absmax: float = 0.0
    token_absmax_mean: float = 0.0
    token_rms_mean: float = 0.0
    abs_mean: float = 0.0
    rows: list[torch.Tensor] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, float | int]:
        return {"tokens": self.tokens, "absmax": self.absmax, "token_absmax_mean": self.token_absmax_mean,
                "token_rms_mean": self.token_rms_mean, "abs_mean": self.abs_mean,
                "rows_kept": sum(r.shape[0] for r in self.rows)}


def target_layers(model: nn.Module, keep: Iterable[str]) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers that become ternary (all but ``keep``)."""
    keep = tuple(keep)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not kept(n, keep)]


@torch.no_grad()
def collect(model: nn.Module, layers: Sequence[str], windows: torch.Tensor, *, batch_size: int = 8,
            rows: int = 512) -> dict[str, LayerStats]:
    """Input statistics of ``layers`` over ``windows`` (N, T) of token ids, run in batches.
    ``rows`` input rows per layer are kept for ``choose_thresholds``; 0 keeps none (every row
    seen is held until the end to pick them, so pass 0 when no thresholds are chosen).

    Raises:
        ValueError: no windows, or a layer name is not a Linear of the model.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"need calibration windows (N, T) with N >= 1, got shape {tuple(windows.shape)}")
    modules = dict(model.named_modules())
    missing = [n for n in layers if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"not Linear layers of {type(model).__name__}: {', '.join(missing)}")
    sums = {n: torch.zeros(4, dtype=torch.float64) for n in layers}  # token absmax, token rms, |x| sum, count
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    stats = {n: LayerStats() for n in layers}

    def hook(name: str):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (M, in)
            s = sums[name]
            s[0] += x.abs().amax(dim=-1).sum()
            s[1] += x.square().mean(dim=-1).sqrt().sum()
            s[2] += x.abs().mean(dim=-1).sum()
            s[3] += x.shape[0]
            stats[name].absmax = max(stats[name].absmax, float(x.abs().max()))
            if rows:
                seen[name].append(x.float())
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for n in layers:
        s, st = sums[n], stats[n]
        count = int(s[3])
        st.tokens = count
        st.token_absmax_mean, st.token_rms_mean, st.abs_mean = (float(v / max(count, 1)) for v in s[:3])
        every = torch.cat(seen[n]) if seen[n] else torch.zeros(0)
        if every.shape[0] > rows:  # evenly strided: deterministic, spread over the whole data
            every = every[torch.linspace(0, every.shape[0] - 1, rows).round().long()]
        st.rows = [every.cpu()]
    return stats


@torch.no_grad()
def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    ref = x @ w.T
    return float((x @ (w - q).T).square().sum() / ref.square().sum().clamp(min=1e-30))


@torch.no_grad()
def choose_thresholds(model: nn.Module, stats: dict[str, LayerStats], grid: Sequence[float]) -> \
        tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per layer, the grid threshold with the least relative output error on its kept rows.
    A layer that saw no calibration input (unused by the model's forward, e.g. a disabled
    memory) gets none and keeps BitNet's absmean.

    Returns:
        ``(thresholds {layer: t}, errors {layer: {"absmean": e, "<t>": e, ...}})``.
    Raises:
        ValueError: empty grid.
    """
    if not grid:
        raise ValueError("threshold grid is empty")
    modules = dict(model.named_modules())
    chosen, table = {}, {}
    for name, st in stats.items():
        x = torch.cat(st.rows) if st.rows else torch.zeros(0)
        if x.shape[0] == 0:
            continue
        w = modules[name].weight.detach().float().cpu()
        errors = {"absmean": _output_error(x, w, weight_quant(w))}
        for t in grid:
            errors[f"{t:g}"] = _output_error(x, w, weight_quant(w, float(t)))
        best = min(grid, key=lambda t: (errors[f"{t:g}"], t))
        chosen[name], table[name] = float(best), errors
    return chosen, table


def add_sub_norm(model: nn.Module, stats: dict[str, LayerStats]) -> nn.Module:
    """A copy of Cognate ``model`` with SubLN, each norm's gain the calibrated input RMS of the
    projection after it (module docstring). Every other tensor is the input's.

    Raises:
        PhaseError: the model is not a Cognate model, already has SubLN, or calibration did not
            cover a projection that gets a norm (it must be among the quantized layers).
    """
    config = model.config
    if getattr(config, "model_type", None) != "cognate":
        raise PhaseError("bitnet", f"sub_norm is defined for Cognate models; this is a {config.model_type!r} "
                                   "model: set bitnet.sub_norm false")
    if getattr(config, "sub_norm", False):
        raise PhaseError("bitnet", "the input model already has SubLN (was it quantized before?)")
    new_config = type(config).from_dict({**config.to_dict(), "sub_norm": True})
    new = type(model)(new_config).to(next(model.parameters()).device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("sub_norm.weight") for k in missing):
        raise PhaseError("bitnet", f"SubLN rebuild does not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key in missing:
            prefix = key.removesuffix("sub_norm.weight")
            proj = prefix + ("o_proj" if prefix.endswith("attn.") else "down_proj")
            if proj not in stats:
                raise PhaseError("bitnet", f"no calibration statistics for {proj} (is it in bitnet.keep?): "
                                           "SubLN's gain comes from them")
            new.get_parameter(key).fill_(stats[proj].token_rms_mean)
    return new.train(model.training)
