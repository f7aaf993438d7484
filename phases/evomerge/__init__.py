"""Phase 2, EvoMerge: merge operators (this increment) and, later, the evolutionary search.

``phases.evomerge.merge(method, models, *, base=None, parameters=None)`` merges state dicts with
mergekit's parameter names and semantics; :data:`METHODS` lists the methods. Plain PyTorch, no Ray.
"""

from phases.evomerge.merge import METHODS, MergeError, merge, merge_tensor

__all__ = ["METHODS", "MergeError", "merge", "merge_tensor"]
