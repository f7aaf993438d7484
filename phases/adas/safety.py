"""Phase 7's safety gates: a candidate's measurements against every requirement of the target
profile. A candidate passes only when every stated requirement holds; a requirement whose value
could not be measured on this machine fails (nothing is certified unmeasured).

Each check is one :class:`Requirement` row: what is required, the limit, the measured value,
pass or fail, and the evidence (the file holding the raw measurement). The same rows make the
compliance certificate (``certificate.py``) and the rejection reasons in the archive.

The measurements (``metrics``) a candidate brings, as the phase's evaluation writes them:
``call_p95_ms``, ``call_p99_ms``, ``call_max_ms``, ``token_p95_ms``, ``token_p99_ms``,
``token_max_ms`` (ms, warm-up excluded), ``memory_bytes`` (peak resident growth while the
artifact loads and runs; None where not measurable), ``disk_bytes``, ``retention`` (held-out
accuracy / the input model's), ``parity`` (max |logit diff| / max |logit| vs the fp32 eager
twin), ``precision``, ``backend``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phases.adas.profiles import TargetProfile

__all__ = ["Requirement", "check", "reasons", "retention", "write_evidence"]

_MIB = 2 ** 20


@dataclass(frozen=True)
class Requirement:
    """One requirement of a profile checked against one measurement."""

    name: str  # e.g. "call_p99_ms"
    description: str  # what it means, with the comparison
    limit: Any
    measured: Any  # None: could not be measured (the requirement fails)
    unit: str
    passed: bool
    evidence: str  # file (relative to the phase folder) holding the raw measurement

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def reason(self) -> str:
        if self.measured is None:
            return f"{self.name}: not measurable here (required {self.description})"
        shown = f"{self.measured:.4g}" if isinstance(self.measured, float) else str(self.measured)
        return f"{self.name} = {shown} {self.unit}".rstrip() + f" breaks {self.description}"


def _at_most(name: str, what: str, limit: float | None, value: Any, unit: str, evidence: str,
             scale: float = 1.0) -> Requirement | None:
    if limit is None:
        return None
    measured = None if value is None else float(value) / scale
    return Requirement(name, f"{what} <= {limit:g} {unit}".rstrip(), limit, measured, unit,
                       measured is not None and measured <= limit, evidence)


def check(profile: TargetProfile, metrics: Mapping[str, Any], *, evidence: str) -> list[Requirement]:
    """Every requirement ``profile`` states, checked against ``metrics`` (see the module
    docstring), in a fixed order.

    Args:
        evidence: the file that holds this candidate's raw measurements (named on each row).
    """
    rows: list[Requirement | None] = [
        Requirement("precision", f"one of {list(profile.precisions)}", list(profile.precisions),
                    metrics.get("precision"), "", metrics.get("precision") in profile.precisions, evidence),
        Requirement("backend", f"one of {list(profile.backends)}", list(profile.backends),
                    metrics.get("backend"), "", metrics.get("backend") in profile.backends, evidence),
        _at_most("call_p95_ms", "p95 latency of one call", profile.call_p95_ms, metrics.get("call_p95_ms"), "ms",
                 evidence),
        _at_most("call_p99_ms", "p99 latency of one call", profile.call_p99_ms, metrics.get("call_p99_ms"), "ms",
                 evidence),
        _at_most("token_p95_ms", "p95 latency of one generated token", profile.token_p95_ms,
                 metrics.get("token_p95_ms"), "ms", evidence),
        _at_most("token_p99_ms", "p99 latency of one generated token", profile.token_p99_ms,
                 metrics.get("token_p99_ms"), "ms", evidence),
    ]
    if profile.hard_deadline:  # every timed call / step inside its budget: a miss rejects
        rows.append(_at_most("call_deadline_ms", "slowest timed call (hard deadline)", profile.call_p99_ms,
                             metrics.get("call_max_ms"), "ms", evidence))
        rows.append(_at_most("token_deadline_ms", "slowest timed decoding step (hard deadline)",
                             profile.token_p99_ms, metrics.get("token_max_ms"), "ms", evidence))
    rows += [
        _at_most("memory_mb", "peak resident growth", profile.memory_cap_mb, metrics.get("memory_bytes"), "MiB",
                 evidence, scale=_MIB),
        _at_most("disk_mb", "artifact size on disk", profile.disk_cap_mb, metrics.get("disk_bytes"), "MiB",
                 evidence, scale=_MIB),
        _at_most("parity", "max |logit diff| / max |logit| vs the fp32 eager twin", profile.max_parity_error,
                 metrics.get("parity"), "", evidence),
    ]
    retention = metrics.get("retention")
    rows.append(Requirement("accuracy_retention", f"held-out accuracy / input's >= {profile.min_accuracy_retention:g}",
                            profile.min_accuracy_retention, None if retention is None else float(retention), "",
                            retention is not None and float(retention) >= profile.min_accuracy_retention, evidence))
    return [r for r in rows if r is not None]


def reasons(rows: list[Requirement]) -> list[str]:
    """The failed rows as one-line reasons (empty: the candidate passed)."""
    return [r.reason() for r in rows if not r.passed]


def retention(accuracy: float, reference: float) -> float:
    """The accuracy floor's measure: ``accuracy / reference``; 1.0 when the reference scores 0
    (there is no accuracy to lose)."""
    return accuracy / reference if reference > 0 else 1.0


def write_evidence(path: str | Path, *, recipe: Any, metrics: Mapping[str, Any], speed: Mapping[str, Any] | None,
                   requirements: list[Requirement]) -> Path:
    """One candidate's evidence file: the recipe, every metric, the raw latency samples
    (``call_samples_ms``, ``token_samples_ms``) and the requirement rows: what the certificate
    cites and :func:`~phases.adas.certificate.verify_certificate` re-derives."""
    from serialization.checkpoint import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": recipe.key(), "recipe": recipe.to_json(), "metrics": dict(metrics),
                             "call_samples_ms": list((speed or {}).get("call_samples_ms", [])),
                             "token_samples_ms": list((speed or {}).get("token_samples_ms", [])),
                             "requirements": [r.to_json() for r in requirements]})
    return path
