"""Configuration of Phase 7, ADAS (deployment architecture search): the ``adas:`` section.

The search runs ``generations`` rounds of ``population`` new candidates each (``search.py``),
over the space the target profile allows on this machine (``recipes.build_space``), and
certifies the winner against the profile (``safety.py``, ``certificate.py``). Latency numbers
follow common benchmarking practice (warm-up excluded, p50/p95/p99 over the timed repeats).
A bad value raises ConfigError naming the field and what is allowed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from phases.adas.profiles import BUILTIN_PROFILES, TargetProfile
from phases.data.config import FrozenConfig

__all__ = ["AdasConfig"]


class AdasConfig(FrozenConfig):
    """The ``adas:`` section."""

    profile: str = "edge-cpu"  # a built-in profile (phases/adas/profiles.py) or one of ``profiles``
    profiles: dict[str, TargetProfile] = Field(default_factory=dict)  # user profiles (shadow built-ins by name)
    # deterministic: the search ranks by accuracy, FLOPs per token and bytes on disk (same proposals on every
    # machine); measured: by accuracy, p95 latency, bytes and memory (independent runs may differ). The gates
    # always use the measured latencies and memory.
    decision: Literal["deterministic", "measured"] = "deterministic"
    generations: int = Field(3, ge=1)
    population: int = Field(6, ge=1)  # new candidates per generation
    mutation_rate: float | None = Field(None, gt=0.0, le=1.0)  # per gene; None: 1 / number of genes
    # the architecture genes searched (1.0, "unchanged", is always in)
    # search only these of the profile's backends (None: all it allows); the certificate still checks the profile
    backends: tuple[Literal["eager", "compile", "onnxruntime", "tensorrt"], ...] | None = None
    max_drop_layers: int = Field(1, ge=0)
    ffn_keep: tuple[float, ...] = (0.75, 0.5)
    low_rank: tuple[float, ...] = (0.5,)
    calibration_windows: int = Field(8, ge=1)  # training windows for Block Influence and FFN neuron scores
    eval_batch_size: int = Field(8, ge=1)  # held-out windows per accuracy batch
    eval_batches: int = Field(2, ge=1)
    warmup: int = Field(3, ge=0)  # untimed calls before the timed ones
    repeats: int = Field(30, ge=1)  # timed calls per candidate
    token_repeats: int = Field(3, ge=1)  # timed generations (each new_tokens steps) per candidate
    agent_cpus: float = Field(0.2, gt=0)  # CPUs each of the nine agents reserves
    task_timeout_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "AdasConfig":
        for name in ("ffn_keep", "low_rank"):
            bad = [v for v in getattr(self, name) if not 0.0 < v <= 1.0]
            if bad:
                raise ValueError(f"{name} fractions must be in (0, 1], got {bad}")
        known = {**BUILTIN_PROFILES, **self.profiles}
        if self.profile not in known:
            raise ValueError(f"profile {self.profile!r} is not a built-in profile nor in adas.profiles; "
                             f"known: {', '.join(sorted(known))}")
        return self

    def target(self) -> TargetProfile:
        """The chosen profile. Raises KeyError listing the known names."""
        from phases.adas.profiles import resolve_profile

        return resolve_profile(self.profile, dict(self.profiles))
