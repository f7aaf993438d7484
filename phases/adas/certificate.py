"""Phase 7's compliance certificate: for the deployed winner, each requirement of the target
profile, the measured value, pass or fail, and the evidence file that holds the measurement.

``certificate.json`` holds the profile (every field), the machine the measurements were taken on
(a certificate holds for the machine measured, which need not be the profile's hardware class),
the recipe, the artifact's files with their sha256, the requirement rows (``safety.check``), the
soft target (``target_ms``: met or not, never gating), and the evidence files with their sha256.
``certificate.md`` is the same as a table for people.

:func:`verify_certificate` re-derives every number: each evidence file must hash as recorded, the
latency percentiles must equal those recomputed from the raw samples stored in it, and every
other measured value must equal the evidence's. A certificate whose numbers do not come from its
evidence fails to verify.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.errors import ArtifactError
from phases.adas.measure import percentiles
from phases.adas.safety import Requirement

__all__ = ["machine", "sha256_file", "verify_certificate", "write_certificate"]

FORMAT = "agentforge.adas.certificate/1"
_LATENCY = {"call_p95_ms": ("call", "p95"), "call_p99_ms": ("call", "p99"), "call_deadline_ms": ("call", "max"),
            "token_p95_ms": ("token", "p95"), "token_p99_ms": ("token", "p99"), "token_deadline_ms": ("token", "max")}
_SCALED = {"memory_mb": ("memory_bytes", 2 ** 20), "disk_mb": ("disk_bytes", 2 ** 20), "parity": ("parity", 1),
           "accuracy_retention": ("retention", 1)}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def machine() -> dict[str, Any]:
    """The machine the measurements ran on: OS, CPU, cores, library versions, GPU if any."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": None}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def write_certificate(out_dir: str | Path, *, profile_name: str, profile: Mapping[str, Any],
                      candidate: Mapping[str, Any],
                      rows: Sequence[Requirement], artifact_dir: str | Path, evidence: Mapping[str, str | Path],
                      reference: Mapping[str, Any], machine_info: Mapping[str, Any]) -> Path:
    """Write ``certificate.json`` and ``certificate.md`` into ``out_dir``; returns the JSON's path.

    Args:
        candidate: the winner's archive entry (``Candidate.to_json()``).
        rows: its requirement rows (``safety.check``).
        artifact_dir: the exported artifact (its files are hashed).
        evidence: name (as the rows name it, a path relative to ``out_dir``) -> evidence file.
        reference: the input model's measurements (what retention is relative to).
    """
    from serialization.checkpoint import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    art = Path(artifact_dir)
    files = {p.relative_to(art).as_posix(): sha256_file(p) for p in sorted(art.rglob("*")) if p.is_file()}
    target = profile.get("target_ms")
    p99 = candidate["metrics"].get("call_p99_ms")
    soft = None if target is None else {"target_ms": target, "call_p99_ms": p99,
                                        "met": p99 is not None and p99 <= target, "gating": False}
    cert = {
        "format": FORMAT, "profile": profile_name, "requirements_of": dict(profile), "machine": dict(machine_info),
        "recipe": candidate["recipe"], "candidate": candidate["key"], "artifact": {"dir": str(art), "files": files},
        "requirements": [r.to_json() for r in rows], "passed": all(r.passed for r in rows), "soft_target": soft,
        "evidence": {name: {"file": _relative(Path(path), out), "sha256": sha256_file(path)}
                     for name, path in evidence.items()},
        "reference": dict(reference),
        "note": "every measured value comes from the evidence file named on its row; the certificate holds for "
                "the machine above, which need not be the profile's hardware class",
    }
    path = out / "certificate.json"
    atomic_write_json(path, cert)
    lines = [f"# Deployment certificate: profile `{profile_name}`", "",
             f"Candidate `{candidate['key']}`; recipe `{json.dumps(candidate['recipe'], sort_keys=True)}`.",
             f"Measured on: {machine_info.get('processor')} ({machine_info.get('cpu_count')} cores), "
             f"{machine_info.get('platform')}, torch {machine_info.get('torch')}"
             + (f", GPU {machine_info['cuda']}" if machine_info.get("cuda") else "") + ".",
             f"Profile hardware class: {profile.get('hardware_class')}.", "",
             "| requirement | limit | measured | unit | result | evidence |", "|---|---|---|---|---|---|"]
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")  # a table cell

    for r in rows:
        shown = "not measured" if r.measured is None else (f"{r.measured:.4g}" if isinstance(r.measured, float)
                                                           else str(r.measured))
        lines.append(f"| {cell(r.description)} | {cell(r.limit)} | {cell(shown)} | {r.unit} | "
                     f"{'pass' if r.passed else 'FAIL'} | {Path(r.evidence).name} |")
    if soft is not None:
        lines += ["", f"Soft target (not gating): call p99 {p99:.4g} ms vs target {target:g} ms: "
                      f"{'met' if soft['met'] else 'not met'}."]
    lines += ["", f"Verdict: {'PASS' if cert['passed'] else 'FAIL'}.", ""]
    tmp = out / "certificate.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "certificate.md")
    return path


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def verify_certificate(path: str | Path, *, root: str | Path | None = None) -> None:
    """Check that every number of the certificate at ``path`` comes from its evidence (module
    docstring). Relative evidence paths are read under ``root`` (default: the certificate's folder).

    Raises:
        ArtifactError: naming the file or the row that does not verify.
    """
    path = Path(path)
    cert = json.loads(path.read_text())
    if cert.get("format") != FORMAT:
        raise ArtifactError(str(path), f"not an ADAS certificate (format {cert.get('format')!r})")
    base = Path(root) if root is not None else path.parent
    loaded: dict[str, dict[str, Any]] = {}
    for name, ev in cert["evidence"].items():
        file = Path(ev["file"]) if Path(ev["file"]).is_absolute() else base / ev["file"]
        if not file.is_file():
            raise ArtifactError(str(file), f"evidence {name!r} is missing")
        if sha256_file(file) != ev["sha256"]:
            raise ArtifactError(str(file), f"evidence {name!r} was altered (sha256 differs)")
        loaded[name] = json.loads(file.read_text())
    for row in cert["requirements"]:
        data = loaded.get(str(row["evidence"]))
        if data is None:
            raise ArtifactError(str(path), f"row {row['name']!r} names evidence {row['evidence']!r}, "
                                           f"which the certificate does not list")
        measured = row["measured"]
        if row["name"] in _LATENCY:
            kind, stat = _LATENCY[row["name"]]
            want = percentiles(data[f"{kind}_samples_ms"])[stat]
        elif row["name"] in _SCALED:
            key, scale = _SCALED[row["name"]]
            raw = data["metrics"].get(key)
            want = None if raw is None else float(raw) / scale
        else:
            want = data["metrics"].get(row["name"])
        if (measured is None) != (want is None) or (
                measured is not None and (not _close(float(measured), float(want)) if isinstance(want, float)
                                          else measured != want)):
            raise ArtifactError(str(path), f"row {row['name']!r} says {measured!r}, its evidence gives {want!r}")
        if row["passed"] != _holds(row, measured):
            raise ArtifactError(str(path), f"row {row['name']!r}: passed={row['passed']} does not follow from "
                                           f"{measured!r} against {row['limit']!r}")


def _holds(row: Mapping[str, Any], measured: Any) -> bool:
    if measured is None:
        return False
    if row["name"] in ("precision", "backend"):
        return measured in row["limit"]
    if row["name"] == "accuracy_retention":
        return float(measured) >= float(row["limit"])
    return float(measured) <= float(row["limit"])
