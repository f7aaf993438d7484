"""Layer layouts: frankenmerge (mergekit's ``passthrough`` over layer slices) and DFS merging
(the data-flow space of Akiba et al. 2024: an inference path through the layers of several
models). Both change which decoder layers a model has, and in which order; weights are copied,
never changed. Plain PyTorch on state dicts; :func:`layout_config` gives the child's config.

Names: a decoder layer's tensors are ``<prefix>layers.<i>.<rest>`` (``model.layers.3.mlp...``
in Llama-style and Cognate models). Tensors outside the layers:

- :func:`frankenmerge` follows mergekit's planner (``plan.py``): "pre" weights (embeddings)
  come from the first slice's model, everything else outside the layers (final norm, head;
  a Cognate model's memory and pondered block) from the last slice's model;
- :func:`dfs_merge` takes them from one model, ``rest_from`` (Sakana's "model A supplies the
  embeddings"; in a genome, the parameter-space merge).

Left out, and why: DFS's learned input-scaling matrix W (Akiba et al.) scales each hop's input;
a standard HF model dir has no place for it (it would need a new architecture class, as
EvoMistral's ``trust_remote_code``), and every output of this product loads without remote code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from phases.evomerge.errors import MergeError

__all__ = ["LAYOUTS", "dfs_merge", "frankenmerge", "layer_indices", "layout_config", "path_from_bits"]

LAYOUTS: tuple[str, ...] = ("frankenmerge", "dfs")
_LAYER = re.compile(r"^(.*?(?:^|\.)layers\.)(\d+)(\..+)$")
_PRE = re.compile(r"(?:^|\.)(embed_tokens|wte|wpe|embed_in|word_embeddings)\.")

StateDict = Mapping[str, torch.Tensor]


def layer_indices(state: StateDict) -> list[int]:
    """The decoder layer indices present in a state dict, sorted."""
    return sorted({int(m.group(2)) for k in state if (m := _LAYER.match(k))})


def _split(state: StateDict) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor], str]:
    """(layer index -> {rest of name: tensor}, tensors outside the layers, the layers' prefix)."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    prefixes = set()
    for k, v in state.items():
        m = _LAYER.match(k)
        if m is None:
            rest[k] = v
        else:
            prefixes.add(m.group(1))
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = v
    if len(prefixes) > 1:
        raise MergeError(f"more than one layer stack ({', '.join(sorted(prefixes))}): layouts need exactly one",
                         [("models", "several layer stacks")])
    return layers, rest, prefixes.pop() if prefixes else "layers."


def _compose(path: Sequence[tuple[int, int]], models: Sequence[StateDict], rest: Mapping[str, torch.Tensor],
             what: str) -> dict[str, torch.Tensor]:
    split = [_split(m) for m in models]
    prefix = split[0][2]
    if not path:
        raise MergeError(f"{what}: the layout has no layers", [("layout", "empty")])
    out = dict(rest)
    for k, (model, layer) in enumerate(path):
        if not 0 <= model < len(models):
            raise MergeError(f"{what}: model index {model} out of range (0..{len(models) - 1})",
                             [("layout", f"model {model}")])
        layers = split[model][0]
        if layer not in layers:
            raise MergeError(f"{what}: model {model} has no layer {layer} (it has {len(layers)})",
                             [("layout", f"layer {layer} of model {model}")])
        for name, t in layers[layer].items():
            out[f"{prefix}{k}{name}"] = t
    return out


def frankenmerge(models: Sequence[StateDict], slices: Sequence[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """mergekit's passthrough frankenmerge: the output's layers are, in order, layers
    ``start..end-1`` of ``model`` for each ``(model, start, end)`` in ``slices`` (mergekit's
    ``slices: [{sources: [{model, layer_range: [start, end]}]}]``). Embeddings come from the
    first slice's model, the other non-layer tensors from the last slice's.

    Raises:
        MergeError: no slices, an empty or out-of-range slice.
    """
    if not slices:
        raise MergeError("frankenmerge needs at least one slice", [("slices", "empty")])
    path = []
    for model, start, end in slices:
        if end <= start:
            raise MergeError(f"frankenmerge: slice layer_range [{start}, {end}] is empty",
                             [("slices", f"[{start}, {end}]")])
        path.extend((model, i) for i in range(start, end))
    first, last = slices[0][0], slices[-1][0]
    for m in (first, last):
        if not 0 <= m < len(models):
            raise MergeError(f"frankenmerge: model index {m} out of range", [("slices", f"model {m}")])
    rest = {k: v for k, v in _split(models[last])[1].items() if not _PRE.search(k)}
    rest.update({k: v for k, v in _split(models[first])[1].items() if _PRE.search(k)})
    return _compose(path, models, rest, "frankenmerge")


def dfs_merge(models: Sequence[StateDict], path: Sequence[tuple[int, int]], *, rest_from: int = 0
              ) -> dict[str, torch.Tensor]:
    """Data-flow merging: the output's layer k is layer ``path[k][1]`` of model ``path[k][0]``
    (a layer may appear several times); tensors outside the layers come from ``rest_from``.

    Raises:
        MergeError: an empty path, or a hop naming a model or layer that does not exist.
    """
    if not 0 <= rest_from < len(models):
        raise MergeError(f"dfs: rest_from {rest_from} out of range", [("rest_from", str(rest_from))])
    return _compose(path, models, _split(models[rest_from])[1], "dfs")


def path_from_bits(bits: Sequence[int], n_sources: int, n_layers: int) -> list[tuple[int, int]]:
    """Akiba et al.'s indicator array: slot j stands for layer ``j % n_layers`` of source
    ``(j // n_layers) % n_sources`` in repeat ``j // (n_sources * n_layers)``; the path is the
    slots set to 1, in order (so layers run in sequence, each model's in turn, repeated)."""
    per_repeat = n_sources * n_layers
    if n_layers < 1 or n_sources < 1 or len(bits) % per_repeat:
        raise MergeError(f"a layout of {len(bits)} bits does not fit {n_sources} sources x {n_layers} layers",
                         [("layout", "length")])
    return [((j // n_layers) % n_sources, j % n_layers) for j, b in enumerate(bits) if b]


def layout_config(config_dict: dict, old_layers: int, new_layers: int) -> dict:
    """A config dict for a model whose layer stack went from ``old_layers`` to ``new_layers``
    layers: ``num_hidden_layers`` changes by the difference (a Cognate model counts its
    pondered block in it, beside the stack)."""
    out = dict(config_dict)
    out["num_hidden_layers"] = int(config_dict["num_hidden_layers"]) - old_layers + new_layers
    return out
