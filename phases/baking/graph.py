"""Graph-level rewrites of a loaded Cognate model, each measured before it is kept.

Two rewrites, applied in place to a model in memory (the weights on disk never change; a deployment
package lists the rewrites by name and :func:`load_optimized` re-applies them at load time):

- ``fuse_qkv``: the attention's three input projections become one ``qkv_proj`` whose weight is the
  three weights stacked, so q, k and v come from one matmul and a split (as in GPT-2's ``c_attn`` and
  Megatron's fused QKV). The attention gets an instance-bound forward doing the same math.
- ``fold_norms``: an RMSNorm's gain w feeds only Linear layers, and ``W (x_hat * w) = (W diag(w)) x_hat``,
  so w is multiplied into the consumers' weight columns and the norm keeps only x * rsqrt(mean(x^2) + eps).
  BitLinear consumers are skipped: they quantize their weight, and a rescaled weight quantizes differently.

What is measured (:func:`measure_rewrites`): for each rewrite alone and for all of them together, on a
deep copy, the logits' parity with the original (max absolute difference, top-1 agreement) and the
forward latency p50 of original and rewritten model, timed in the same process with their passes
interleaved (ABBA order, so drift and warm caches hit both alike). A rewrite is kept only when parity
holds (max_abs_diff <= atol) and speedup = before / after >= ``min_speedup``; otherwise it is reported
with the reason and not applied. Numbers compare only with each other (same machine, same run).
"""

from __future__ import annotations

import copy
import time
import types
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phases.cognate.modeling import (CognateAttention, CognateBlock, CognateForCausalLM, CognateMLP, CognateRMSNorm,
                                     _rotate)

__all__ = ["REWRITES", "UnitRMSNorm", "apply_rewrites", "fold_norms", "fuse_qkv", "load_optimized",
           "logits_parity", "measure_rewrites", "p50", "paired_latency_ms"]


# -- shared measurement helpers (also used by accelerate.py, memory.py and hardware.py) ------------------

def paired_latency_ms(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                      device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Wall times (ms) of several no-argument callables, interleaved so each sees the same conditions.

    Round r runs the callables in order, reversed every other round (ABBA...), ``warmup`` untimed rounds
    first. On CUDA the device is synchronised around each call (kernels run asynchronously).

    Returns:
        name -> the ``repeats`` times in ms (take ``np.percentile(..., 50)`` for p50).
    Raises:
        ValueError: repeats < 1 or warmup < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter_ns()
            fns[name]()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append((time.perf_counter_ns() - start) / 1e6)
    return times


def p50(times: list[float]) -> float:
    """Median (numpy's linear-interpolation percentile 50) of a list of times."""
    return float(np.percentile(np.asarray(times, dtype=np.float64), 50))


@torch.no_grad()
def logits_parity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """``{"max_abs_diff", "top1_agreement"}`` of two (B, T, V) logits (compared in float32)."""
    ref, oth = reference.float(), other.float()
    return {"max_abs_diff": float((ref - oth).abs().max()),
            "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean())}


def _plain_linear(m: object) -> bool:
    """A true ``nn.Linear`` (not a subclass such as BitLinear, whose forward quantizes its weight)."""
    return type(m) is nn.Linear


# -- fuse_qkv ------------------------------------------------------------------------------------------

def _fused_attention_forward(self, x, cos, sin, attn_mask):
    """CognateAttention.forward with q, k, v from one matmul (bound to a fused instance)."""
    bsz, seq, width = x.shape
    q, k, v = (t.view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
               for t in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
    return self.o_proj(self.sub_norm(out.transpose(1, 2).reshape(bsz, seq, width)))  # (B, T, C)


def _fusable(attn: nn.Module) -> bool:
    # The fused forward reproduces CognateAttention.forward, so only modules running that forward qualify.
    if not isinstance(attn, CognateAttention) or "forward" in attn.__dict__ \
            or type(attn).forward is not CognateAttention.forward:
        return False
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(_plain_linear(p) and p.bias is None for p in projs):
        return False
    first = projs[0].weight
    return all(p.in_features == projs[0].in_features and p.weight.dtype == first.dtype
               and p.weight.device == first.device for p in projs)


@torch.no_grad()
def fuse_qkv(model: nn.Module) -> int:
    """Replace q_proj/k_proj/v_proj of every CognateAttention by one ``qkv_proj`` (in place).

    Skipped: attentions whose projections are not plain bias-free ``nn.Linear`` (BitLinear), differ in
    input width, dtype or device, or whose forward is not CognateAttention's (already fused, overridden).

    Returns:
        The number of attentions fused.
    """
    fused = 0
    for attn in list(model.modules()):
        if not _fusable(attn):
            continue
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        sizes = [q.out_features, k.out_features, v.out_features]
        qkv = nn.Linear(q.in_features, sum(sizes), bias=False, device=q.weight.device, dtype=q.weight.dtype)
        qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight], dim=0))  # (3C, C)
        qkv.weight.requires_grad_(q.weight.requires_grad)
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.qkv_proj = qkv
        attn.qkv_sizes = sizes
        attn.forward = types.MethodType(_fused_attention_forward, attn)
        fused += 1
    return fused


# -- fold_norms ----------------------------------------------------------------------------------------

class UnitRMSNorm(nn.Module):
    """RMSNorm without a gain: x * rsqrt(mean(x^2) + eps) (the gain was folded into the next Linear)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, gain folded"


def _is_rms_norm(m: object) -> bool:
    return type(m) is CognateRMSNorm and "forward" not in m.__dict__


def _attention_inputs(attn: nn.Module) -> list[nn.Module] | None:
    """The Linears that read an attention's input, or None when its dataflow is not known here."""
    if not isinstance(attn, CognateAttention) or type(attn).forward is not CognateAttention.forward:
        return None
    bound = attn.__dict__.get("forward")
    if bound is None:
        return [attn.q_proj, attn.k_proj, attn.v_proj]
    if getattr(bound, "__func__", None) is _fused_attention_forward:
        return [attn.qkv_proj]
    return None


def _norm_sites(model: nn.Module) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """(owner, attribute name of the norm, its consumer Linears) for every norm whose dataflow is known."""
    sites = []
    for block in model.modules():
        if type(block) is not CognateBlock or ("forward" in block.__dict__ and not _checkpoint_wrapped(block)):
            continue
        attn_in = _attention_inputs(block.attn)
        if attn_in is not None:
            sites.append((block, "input_norm", attn_in))
            sites.append((block.attn, "sub_norm", [block.attn.o_proj]))
        mlp = block.mlp
        if type(mlp) is CognateMLP and "forward" not in mlp.__dict__:
            sites.append((block, "post_attn_norm", [mlp.gate_proj, mlp.up_proj]))
            sites.append((mlp, "sub_norm", [mlp.down_proj]))
    if isinstance(model, CognateForCausalLM) and type(model).forward is CognateForCausalLM.forward:
        sites.append((model.model, "norm", [model.lm_head]))
    return sites


def _checkpoint_wrapped(block: nn.Module) -> bool:
    return "_forward_before_ckpt" in block.__dict__  # memory.enable_checkpointing keeps the dataflow


def _tied(model: nn.Module, linear: nn.Module) -> bool:
    """Whether ``linear``'s weight is shared: registered under another name too, or sharing storage with
    another parameter (e.g. ``lm_head`` tied to the embeddings)."""
    ptr = linear.weight.untyped_storage().data_ptr()
    return sum(p.untyped_storage().data_ptr() == ptr for _, p in model.named_parameters(remove_duplicate=False)) > 1


@torch.no_grad()
def fold_norms(model: nn.Module) -> int:
    """Fold each RMSNorm's gain into the plain Linears that consume its output (in place).

    Folded: every Cognate block's ``input_norm`` (into q/k/v or the fused qkv), ``post_attn_norm`` (into
    gate/up), SubLN norms when present (into o_proj / down_proj) and the final ``model.norm`` (into
    ``lm_head``). Skipped: a norm with a BitLinear consumer (a rescaled weight quantizes differently), with
    a consumer whose weight is tied to another parameter (``lm_head`` tied to the embeddings), or already
    folded. The folded norm becomes :class:`UnitRMSNorm`.

    Returns:
        The number of norms folded.
    """
    folded = 0
    for owner, name, consumers in _norm_sites(model):
        norm = getattr(owner, name)
        if not _is_rms_norm(norm) or not all(_plain_linear(c) and not _tied(model, c) for c in consumers):
            continue
        gain = norm.weight.detach()  # (C_in,)
        for lin in consumers:
            lin.weight.mul_(gain.to(lin.weight.dtype))  # W diag(w): scales input column j by w_j
        setattr(owner, name, UnitRMSNorm(norm.eps))
        folded += 1
    return folded


# -- registry, load-time application -------------------------------------------------------------------

REWRITES: dict[str, Callable[[nn.Module], int]] = {"fuse_qkv": fuse_qkv, "fold_norms": fold_norms}


def apply_rewrites(model: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """Apply the named rewrites in order, in place.

    Returns:
        name -> what the rewrite returned (modules rewritten).
    Raises:
        KeyError: an unknown name (the message lists the valid ones).
    """
    names = list(names)
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise KeyError(f"unknown rewrite(s) {unknown}; valid names: {', '.join(REWRITES)}")
    return {n: REWRITES[n](model) for n in names}


def load_optimized(model_dir, rewrites: Iterable[str]) -> nn.Module:
    """Load a causal LM from ``model_dir`` (Cognate registered), put it in eval mode, apply ``rewrites``.

    Raises:
        KeyError: an unknown rewrite name.
    """
    from transformers import AutoModelForCausalLM  # "cognate" is registered: this module imports its modeling

    rewrites = list(rewrites)
    unknown = [n for n in rewrites if n not in REWRITES]
    if unknown:
        raise KeyError(f"unknown rewrite(s) {unknown}; valid names: {', '.join(REWRITES)}")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    apply_rewrites(model, rewrites)
    return model


# -- measurement ---------------------------------------------------------------------------------------

@torch.no_grad()
def measure_rewrites(model: nn.Module, input_ids: torch.Tensor, *, repeats: int = 20, min_speedup: float = 1.05,
                     atol: float = 1e-4) -> dict:
    """Measure each rewrite alone and all together on deep copies; ``model`` is left unchanged.

    Args:
        model: causal LM (eval mode is used while measuring).
        input_ids: (B, T) the input every forward runs.
        repeats: timed forwards per model (interleaved with the original's).
        min_speedup: before / after p50 latency a rewrite must reach to be applied.
        atol: largest allowed absolute logit difference to the original.
    Returns:
        ``{name: entry for each rewrite, "all": entry, "chosen": [names], "reason": str}``; an entry is
        ``{"rewrites": [names], "counts": {name: modules rewritten}, "max_abs_diff", "top1_agreement",
        "parity": bool, "before_ms_p50", "after_ms_p50", "speedup", "applied": bool, "reason": str}``.
        ``chosen`` is the rewrite set of the applied entry with the largest speedup (``[]`` if none);
        apply it with :func:`apply_rewrites`.
    """
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=input_ids).logits
        combos = {n: [n] for n in REWRITES} | {"all": list(REWRITES)}
        out: dict = {}
        for key, names in combos.items():
            candidate = copy.deepcopy(model).eval()
            counts = apply_rewrites(candidate, names)
            entry: dict = {"rewrites": names, "counts": counts}
            entry |= logits_parity(reference, candidate(input_ids=input_ids).logits)
            entry["parity"] = entry["max_abs_diff"] <= atol
            times = paired_latency_ms({"before": lambda: model(input_ids=input_ids),
                                       "after": lambda: candidate(input_ids=input_ids)},
                                      repeats=repeats, device=input_ids.device)
            entry["before_ms_p50"], entry["after_ms_p50"] = p50(times["before"]), p50(times["after"])
            entry["speedup"] = entry["before_ms_p50"] / max(entry["after_ms_p50"], 1e-9)
            if sum(counts.values()) == 0:
                entry["applied"], entry["reason"] = False, "nothing to rewrite: no module matched"
            elif not entry["parity"]:
                entry["applied"] = False
                entry["reason"] = f"parity failed: max |logit diff| {entry['max_abs_diff']:.3g} > atol {atol:g}"
            elif entry["speedup"] < min_speedup:
                entry["applied"] = False
                entry["reason"] = f"measured speedup {entry['speedup']:.3f}x < min_speedup {min_speedup:g}x"
            else:
                entry["applied"] = True
                entry["reason"] = f"parity ok, measured speedup {entry['speedup']:.3f}x >= {min_speedup:g}x"
            out[key] = entry
    finally:
        model.train(was_training)
    applied = [k for k in combos if out[k]["applied"]]
    if applied:
        best = max(applied, key=lambda k: out[k]["speedup"])
        out["chosen"] = list(out[best]["rewrites"])
        out["reason"] = f"{best!r} is the fastest set with parity ({out[best]['speedup']:.3f}x)"
    else:
        out["chosen"] = []
        out["reason"] = "no rewrite set kept parity and reached min_speedup"
    return out
