"""Phase 2, EvoMerge: merge operators (``merge``), layer layouts (``layout``: frankenmerge and
DFS), the genome and its variation operators (``genome``), the composite fitness
(``fitness``), and the searches over genomes: generational (``evolution``) and continuous
breeding (``steady``). Plain PyTorch and Python, no Ray; the Ray Tune driver is
``coordinator/drivers/evomerge.py``.

``phases.evomerge.merge(method, models, *, base=None, parameters=None)`` merges state dicts with
mergekit's parameter names and semantics; :data:`METHODS` lists the methods.
``frankenmerge(models, slices)`` is mergekit's passthrough over layer slices and
``dfs_merge(models, path)`` a data-flow path through the layers of several models.
"""

import importlib
from typing import Any

# Names are loaded on first use (PEP 562): the CLI and the coordinator read EvoMergeConfig
# (phases.evomerge.config) without importing torch.
_HOME = {
    **dict.fromkeys(("EVOLVABLE", "Genome", "crossover", "diversity", "layer_group", "mutate", "random_genome",
                     "tournament"), "genome"),
    **dict.fromkeys(("LAYOUTS", "dfs_merge", "frankenmerge", "path_from_bits"), "layout"),
    **dict.fromkeys(("METHODS", "merge", "merge_tensor"), "merging"),
    "MergeError": "errors",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'phases.evomerge' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["EVOLVABLE", "LAYOUTS", "METHODS", "Genome", "MergeError", "crossover", "dfs_merge", "diversity",
           "frankenmerge", "layer_group", "merge", "merge_tensor", "mutate", "path_from_bits", "random_genome",
           "tournament"]
