"""Merge operators on state dicts, with mergekit's parameter names and semantics.

Methods (mergekit ``merge_methods``; Ilharco et al. 2023 task arithmetic; Yadav et al. 2023
TIES; Yu et al. 2024 DARE; Shoemake 1985 SLERP):

- ``linear``: ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` (default True).
- ``slerp``: spherical interpolation of exactly two models from the base (``t`` in [0, 1]) over
  each whole flattened tensor; falls back to ``lerp`` when the directions are nearly colinear
  (|cos| > 0.9995), as mergekit does.
- ``task_arithmetic``: ``base + lambda * sum_i w_i (x_i - base)`` (``normalize`` default False).
- ``ties``: task vectors trimmed to their top ``density`` fraction by magnitude, a sign elected
  per entry from the *weighted* deltas' sum, then the agreeing weighted deltas summed and, with
  ``normalize`` (default True), divided by the sum of the agreeing weights.
- ``dare_ties`` / ``dare_linear``: task vectors dropped at random (keep probability
  ``density``) and, with ``rescale`` (default True), rescaled to keep their L1 norm (mergekit's
  ``RescaleNorm.l1``, 1/density in expectation); then TIES's sign election (dare_ties) or a
  plain weighted sum (dare_linear). ``normalize`` defaults to False for both.
- ``passthrough``: exactly one model, optionally multiplied by ``scale``.

Layer-layout operators (frankenmerge slices, data-flow paths) act on which layers a model has,
not on tensor values; they are not built yet (issue #4).

Why not call mergekit: its in-memory API builds a task graph per call and its TIES trim sorts
every tensor in full (``argsort``); merging is the inner loop of evolution, so this module does
the same arithmetic with ``topk`` selection, in float32 (or float64 on request) on the tensors'
device. ``tests/phases/test_evomerge_merge.py`` checks equality with mergekit to 1e-6 for the
deterministic methods and in distribution for DARE; ``benchmarks/merge_ops.py`` times both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from phases.evomerge.errors import MergeError

__all__ = ["METHODS", "MergeError", "merge", "merge_tensor"]


# method -> (global parameter defaults, per-model parameter defaults; None = required)
_SPECS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"normalize": True}, {"weight": None}),
    "slerp": ({"t": None}, {}),
    "task_arithmetic": ({"normalize": False, "rescale": False, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "ties": ({"normalize": True, "rescale": False, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "dare_ties": ({"normalize": False, "rescale": True, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "dare_linear": ({"normalize": False, "rescale": True, "lambda": 1.0}, {"weight": None, "density": 1.0}),
    "passthrough": ({"scale": None}, {}),
}
_TASK_VECTOR = {"task_arithmetic": (None, False), "ties": ("magnitude", True), "dare_ties": ("random", True),
                 "dare_linear": ("random", False)}  # method -> (sparsification, sign consensus)
METHODS: tuple[str, ...] = tuple(_SPECS)
_IGNORED = {"int8_mask"}  # mergekit's memory option for masks; no effect on values here
_COLINEAR = 0.9995  # mergekit's slerp DOT_THRESHOLD


def _resolve(method: str, n: int, base: int | None, parameters: Mapping[str, Any] | None) -> tuple[dict, list[dict]]:
    """Split ``parameters`` into global values and one dict of per-model values per model."""
    if method not in _SPECS:
        raise MergeError(f"unknown merge method {method!r}; methods: {', '.join(METHODS)}",
                         [("method", f"unknown {method!r}")])
    glob_spec, model_spec = _SPECS[method]
    params = dict(parameters or {})
    unknown = sorted(set(params) - set(glob_spec) - set(model_spec) - _IGNORED)
    if unknown:
        raise MergeError(f"{method}: unknown parameters {unknown}; it takes {sorted({*glob_spec, *model_spec})}",
                         [(f"parameters.{k}", "unknown") for k in unknown])
    glob = {}
    for key, default in glob_spec.items():
        value = params.get(key, default)
        if value is None and default is None and key != "scale":
            raise MergeError(f"{method}: parameter {key!r} is required", [(f"parameters.{key}", "required")])
        glob[key] = value
    per_model: list[dict] = [{} for _ in range(n)]
    for key, default in model_spec.items():
        value = params.get(key, default)
        if isinstance(value, (list, tuple)):
            values = list(value)
            if base is not None and method in _TASK_VECTOR and len(values) == n - 1:
                values.insert(base, None)  # mergekit's form: one value per non-base model
            if len(values) != n:
                what = f"{n} (one per model) or {n - 1} (one per non-base model)" if base is not None else str(n)
                raise MergeError(f"{method}: {key!r} has {len(value)} values for {n} models; give {what}",
                                 [(f"parameters.{key}", f"needs {what} values")])
        else:
            values = [value] * n
        for i, v in enumerate(values):
            if v is None and i != base:
                raise MergeError(f"{method}: per-model parameter {key!r} is required (model {i})",
                                 [(f"parameters.{key}", "required")])
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise MergeError(f"{method}: {key!r} of model {i} must be a finite number, got {v!r}",
                                 [(f"parameters.{key}", f"not a finite number: {v!r}")])
            per_model[i][key] = v
    for i, pm in enumerate(per_model):
        d = pm.get("density")
        if d is not None and i != base and not 0.0 < d <= 1.0:
            raise MergeError(f"{method}: density of model {i} must be in (0, 1], got {d}",
                             [("parameters.density", f"out of range: {d}")])
    if method == "slerp" and not 0.0 <= float(glob["t"]) <= 1.0:
        raise MergeError(f"slerp: t must be in [0, 1], got {glob['t']}", [("parameters.t", "out of range")])
    return glob, per_model


def _check_arity(method: str, n: int, base: int | None) -> None:
    if base is not None and not 0 <= base < n:
        raise MergeError(f"{method}: base index {base} is not one of the {n} models", [("base", "out of range")])
    if method == "slerp" and (n != 2 or base is None):
        raise MergeError("slerp merges exactly two models and needs base= (the t=0 end)", [("models", "slerp needs 2")])
    if method == "passthrough" and n != 1:
        raise MergeError(f"passthrough takes exactly one model, got {n}", [("models", "passthrough needs 1")])
    if method in _TASK_VECTOR and base is None:
        raise MergeError(f"{method} needs base= (the index of the base model)", [("base", "required")])
    if n < 1:
        raise MergeError("no models to merge", [("models", "empty")])


def _topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes (mergekit's ``magnitude``), by topk:
    O(n) selection where mergekit sorts in full. Ties at the threshold may pick other entries.
    At least one entry is kept: mergekit asserts on a small tensor (a 3-element bias at density
    0.1) instead, which would make some genomes unmergeable."""
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k, sorted=False).indices] = 1
    return mask.view_as(delta)


def _l1_rescaled(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    masked = delta * mask
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = (u0 * u1).sum()
    if dot.abs() > _COLINEAR:
        return (1 - t) * v0 + t * v1
    theta0 = torch.arccos(dot)
    s0 = torch.sin(theta0 - theta0 * t) / torch.sin(theta0)
    s1 = torch.sin(theta0 * t) / torch.sin(theta0)
    return s0 * v0 + s1 * v1


def merge_tensor(method: str, tensors: Sequence[torch.Tensor], *, base: int | None = None,
                 parameters: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                 compute_dtype: torch.dtype = torch.float32, name: str = "tensor") -> torch.Tensor:
    """Merge one tensor's versions (one per model); returns a tensor of the base's (or first's) dtype.

    Args:
        method: one of :data:`METHODS`.
        tensors: the same tensor from each model, same shape.
        base: index of the base model (task-vector methods and slerp).
        parameters: mergekit names; per-model values as sequences in model order.
        generator: the random source of DARE's drops (seed it for reproducible merges).
        compute_dtype: the arithmetic's dtype (float32 as mergekit on CPU; float64 for checks).
        name: the tensor's name, for error messages.
    Raises:
        MergeError: bad method, parameters or shapes.
    """
    n = len(tensors)
    _check_arity(method, n, base)
    glob, per_model = _resolve(method, n, base, parameters)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise MergeError(f"{name}: shapes differ between models: {[tuple(t.shape) for t in tensors]}",
                         [(name, "shape mismatch")])
    out_dtype = tensors[base if base is not None else 0].dtype
    xs = [t.to(compute_dtype) for t in tensors]
    if method == "passthrough":
        out = xs[0] if glob["scale"] is None else xs[0] * float(glob["scale"])
    elif method == "linear":
        w = [float(pm["weight"]) for pm in per_model]
        out = xs[0] * w[0]
        for wi, x in zip(w[1:], xs[1:]):
            out.add_(x, alpha=wi)
        if glob["normalize"]:
            out = out / sum(w)
    elif method == "slerp":
        other = 1 - base
        out = _slerp(float(glob["t"]), xs[base].reshape(-1), xs[other].reshape(-1)).view_as(xs[base])
    else:
        sparsify, consensus = _TASK_VECTOR[method]
        b = xs[base]
        deltas, weights = [], []
        for i, x in enumerate(xs):
            if i == base:
                continue
            delta, density = x - b, float(per_model[i]["density"])
            if sparsify == "magnitude" and density < 1:
                mask = _topk_mask(delta, density)
                delta = _l1_rescaled(delta, mask) if glob["rescale"] else delta * mask
            elif sparsify == "random" and density < 1:
                # Bernoulli(density) per entry, as mergekit's torch.bernoulli(full_like(density)),
                # drawn as uniform < density: the same distribution, about twice as fast on CPU.
                keep = torch.rand(delta.shape, generator=generator, dtype=delta.dtype, device=delta.device) < density
                mask = keep.to(delta.dtype)
                delta = _l1_rescaled(delta, mask) if glob["rescale"] else delta * mask
            deltas.append(delta)
            weights.append(float(per_model[i]["weight"]))
        if not deltas:
            return tensors[base].clone()
        if consensus:
            w = torch.tensor(weights, dtype=compute_dtype, device=b.device).view(-1, *([1] * b.dim()))
            weighted = torch.stack(deltas) * w
            majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(compute_dtype)
            mask = (weighted.sign() == majority).to(compute_dtype)
            mixed = (weighted * mask).sum(0)
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            # No sign election: accumulate in place instead of stacking (one pass per model).
            mixed = torch.zeros_like(b)
            for delta, wi in zip(deltas, weights):
                mixed.add_(delta, alpha=wi)
            total = sum(weights)
            divisor = total if abs(total) >= 1e-8 else 1.0
        if glob["normalize"]:
            mixed = mixed / divisor
        if glob["lambda"] != 1.0:
            mixed = mixed * float(glob["lambda"])
        out = b + mixed
    return out.to(out_dtype)


def merge(method: str, models: Sequence[Mapping[str, torch.Tensor]], *, base: int | None = None,
          parameters: Mapping[str, Any] | None = None, seed: int | None = None,
          per_tensor: Callable[[str], Mapping[str, Any] | None] | None = None,
          compute_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Merge whole state dicts tensor by tensor.

    Args:
        method: one of :data:`METHODS`.
        models: state dicts with the same keys and shapes.
        base: index of the base model in ``models`` (task-vector methods and slerp).
        parameters: mergekit names (``weight``, ``density``, ``t``, ``normalize``, ``rescale``,
            ``lambda``, ``scale``); per-model values as sequences in model order, or, for the
            task-vector methods, one value per non-base model as mergekit takes them.
        seed: seeds DARE's random drops (one generator for the whole merge, tensors in key order).
        per_tensor: ``name -> overrides`` of ``parameters`` for that tensor (e.g. per layer group).
        compute_dtype: the arithmetic's dtype.
    Returns:
        The merged state dict, in the first model's key order. Non-floating tensors (e.g. integer
        buffers) must be equal in every model and are copied.
    Raises:
        MergeError: unknown method, bad parameters, different keys, or mismatched tensors.
    """
    if not models:
        raise MergeError("no models to merge", [("models", "empty")])
    keys = list(models[0])
    for i, sd in enumerate(models[1:], 1):
        if set(sd) != set(keys):
            missing, extra = sorted(set(keys) - set(sd)), sorted(set(sd) - set(keys))
            raise MergeError(f"model {i} has different tensors than model 0: missing {missing[:5]}, "
                             f"extra {extra[:5]}", [("models", "different keys")])
    gens: dict[torch.device, torch.Generator] = {}  # DARE's random source, one per device

    def generator(device: torch.device) -> torch.Generator | None:
        if method not in ("dare_ties", "dare_linear"):
            return None
        if device not in gens:
            gens[device] = torch.Generator(device=device)
            gens[device].manual_seed(0 if seed is None else int(seed))
        return gens[device]

    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [sd[key] for sd in models]
        if not all(t.is_floating_point() for t in tensors):
            first = tensors[0]
            if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
                raise MergeError(f"non-floating tensor {key!r} differs between models", [(key, "differs")])
            out[key] = first.clone()
            continue
        params = dict(parameters or {})
        if per_tensor is not None:
            params.update(per_tensor(key) or {})
        out[key] = merge_tensor(method, tensors, base=base, parameters=params, generator=generator(tensors[0].device),
                                compute_dtype=compute_dtype, name=key)
    return out
