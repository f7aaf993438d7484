"""Phase 7's search space: a deployment recipe for the phase-6 model, and which recipes a target
profile and this machine allow.

A :class:`Recipe` has two kinds of genes. The architecture genes change the weights (``build.py``):
``drop_layers`` (plain blocks removed, lowest Block Influence first), ``ffn_keep`` (fraction of
the FFN width kept, structured pruning), ``low_rank`` (fraction of each projection's rank kept by
truncated SVD; 1.0 keeps them full). The deployment genes change how the artifact runs
(``runtime.py``): ``precision``, ``backend``, ``threads``, ``batch_size``. Proposals are checked
against the declared :class:`Space` (values from its lists, a backend/precision pair this
machine can run): nothing generated is ever executed as code.

:meth:`Recipe.key` names a recipe by the sha256 of its canonical JSON, so measurements stored
under it are found again on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ARCH_GENES", "DEPLOY_GENES", "Recipe", "Space", "build_space"]

ARCH_GENES = ("drop_layers", "ffn_keep", "low_rank")
DEPLOY_GENES = ("precision", "backend", "threads", "batch_size")


@dataclass(frozen=True)
class Recipe:
    """One deployment recipe (see the module docstring). The default is the input model as it is:
    float32, PyTorch eager, one thread, batch 1."""

    drop_layers: int = 0
    ffn_keep: float = 1.0
    low_rank: float = 1.0
    precision: str = "fp32"
    backend: str = "eager"
    threads: int = 1
    batch_size: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Recipe":
        """Raises ValueError naming unknown or missing genes."""
        names = {f.name for f in fields(cls)}
        extra, missing = sorted(set(data) - names), sorted(names - set(data))
        if extra or missing:
            raise ValueError(f"a recipe has exactly the genes {sorted(names)}; unknown {extra}, missing {missing}")
        return cls(**{k: data[k] for k in names})

    def key(self) -> str:
        """12 hex digits of the sha256 of the canonical JSON."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def arch(self) -> tuple[int, float, float]:
        """The architecture genes: recipes sharing them share the built weights."""
        return (self.drop_layers, self.ffn_keep, self.low_rank)

    def arch_key(self) -> str:
        """A folder name for the built architecture, e.g. ``d1-f0.5-r1``."""
        return f"d{self.drop_layers}-f{self.ffn_keep:g}-r{self.low_rank:g}"

    def describe(self) -> str:
        parts = []
        if self.drop_layers:
            parts.append(f"drop {self.drop_layers} layer{'s' if self.drop_layers > 1 else ''}")
        if self.ffn_keep < 1:
            parts.append(f"ffn {self.ffn_keep:g}")
        if self.low_rank < 1:
            parts.append(f"rank {self.low_rank:g}")
        parts.append(f"{self.precision} {self.backend} t{self.threads} b{self.batch_size}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Space:
    """The values each gene may take, and the backend/precision pairs ruled out (with why)."""

    drop_layers: tuple[int, ...]
    ffn_keep: tuple[float, ...]
    low_rank: tuple[float, ...]
    precision: tuple[str, ...]
    backend: tuple[str, ...]
    threads: tuple[int, ...]
    batch_size: tuple[int, ...]
    excluded: tuple[tuple[str, str, str], ...] = ()  # (backend, precision, reason)

    def genes(self) -> dict[str, tuple[Any, ...]]:
        return {g: getattr(self, g) for g in ARCH_GENES + DEPLOY_GENES}

    def allows(self, recipe: Recipe) -> str | None:
        """None when the space holds ``recipe``, else what is wrong."""
        for gene, values in self.genes().items():
            if getattr(recipe, gene) not in values:
                return f"{gene}={getattr(recipe, gene)!r} is not one of {list(values)}"
        for backend, precision, reason in self.excluded:
            if (recipe.backend, recipe.precision) == (backend, precision):
                return f"{backend} with {precision}: {reason}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {**{g: list(v) for g, v in self.genes().items()},
                "excluded": [{"backend": b, "precision": p, "reason": r} for b, p, r in self.excluded]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Space":
        return cls(**{g: tuple(data[g]) for g in ARCH_GENES + DEPLOY_GENES},
                   excluded=tuple((e["backend"], e["precision"], e["reason"]) for e in data.get("excluded", ())))


def build_space(profile: Any, *, plain_layers: int, max_drop: int, ffn_keep: tuple[float, ...],
                low_rank: tuple[float, ...], max_threads: int, device: str,
                unsupported: Callable[[str, str, str], str | None]) -> Space:
    """The space a profile allows on this machine.

    Args:
        profile: a :class:`~phases.adas.profiles.TargetProfile`.
        plain_layers: the input model's droppable blocks; ``drop_layers`` runs 0..min(max_drop, it).
        max_drop: the most blocks a recipe may drop (config).
        ffn_keep, low_rank: the fractions to search (config); 1.0 is always included.
        max_threads: threads this machine gives (the profile's counts above it are left out).
        device: the device the profile runs on here.
        unsupported: ``(backend, precision, device) -> reason | None`` (``runtime.unsupported``).
    Raises:
        ValueError: nothing the profile allows can run here (the message gives every reason).
    """
    pairs = [(b, p) for b in profile.backends for p in profile.precisions]
    reasons = {(b, p): unsupported(b, p, device) for b, p in pairs}
    runnable = [(b, p) for (b, p) in pairs if reasons[(b, p)] is None]
    if not runnable:
        why = "; ".join(f"{b}/{p}: {reasons[(b, p)]}" for b, p in pairs)
        raise ValueError(f"no backend/precision pair the profile allows runs on this machine: {why}")
    backends = tuple(b for b in profile.backends if any(rb == b for rb, _ in runnable))
    precisions = tuple(p for p in profile.precisions if any(rp == p for _, rp in runnable))
    excluded = tuple((b, p, reasons[(b, p)]) for b in backends for p in precisions if reasons[(b, p)] is not None)
    threads = tuple(t for t in profile.threads if t <= max_threads) or (min(profile.threads),)
    return Space(drop_layers=tuple(range(0, min(max_drop, plain_layers) + 1)),
                 ffn_keep=tuple(sorted({1.0, *ffn_keep}, reverse=True)),
                 low_rank=tuple(sorted({1.0, *low_rank}, reverse=True)),
                 precision=precisions, backend=backends, threads=threads,
                 batch_size=tuple(profile.batch_sizes), excluded=excluded)
