"""Phase 2, EvoMerge: merge operators (``merge``), the genome and its variation operators
(``genome``), and the composite fitness (``fitness``); the Tune-driven evolutionary search comes
next (issue #4).

``phases.evomerge.merge(method, models, *, base=None, parameters=None)`` merges state dicts with
mergekit's parameter names and semantics; :data:`METHODS` lists the methods. Plain PyTorch, no Ray.
"""

from phases.evomerge.genome import EVOLVABLE, Genome, crossover, diversity, layer_group, mutate, random_genome, tournament
from phases.evomerge.merge import METHODS, MergeError, merge, merge_tensor

__all__ = ["EVOLVABLE", "METHODS", "Genome", "MergeError", "crossover", "diversity", "layer_group", "merge",
           "merge_tensor", "mutate", "random_genome", "tournament"]
