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

from phases.evomerge.genome import EVOLVABLE, Genome, crossover, diversity, layer_group, mutate, random_genome, tournament
from phases.evomerge.layout import LAYOUTS, dfs_merge, frankenmerge, path_from_bits
from phases.evomerge.merge import METHODS, MergeError, merge, merge_tensor

__all__ = ["EVOLVABLE", "LAYOUTS", "METHODS", "Genome", "MergeError", "crossover", "dfs_merge", "diversity",
           "frankenmerge", "layer_group", "merge", "merge_tensor", "mutate", "path_from_bits", "random_genome",
           "tournament"]
