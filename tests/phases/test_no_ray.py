"""phases/ is plain PyTorch: importing every module under it must not import Ray or msgpack
(CONVENTIONS.md, rule 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import importlib, pkgutil, sys
import phases
names = ["phases"]
for info in pkgutil.walk_packages(phases.__path__, prefix="phases."):
    importlib.import_module(info.name)
    names.append(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "msgpack"))
print(len(names), "modules")
assert not bad, f"importing phases pulled in Ray or msgpack: {bad[:5]}"
assert "phases.cognate.train" in names and "phases.data.corpus" in names, names
"""


def test_importing_every_phases_module_imports_neither_ray_nor_msgpack():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
