"""torch loads only when a tensor is encoded or decoded: agent actors and the coordinator start
without it (about 2 s less per actor start or restart on 2 cores)."""

from __future__ import annotations

import subprocess
import sys

import torch

from serialization import packb
from tests.conftest import ROOT, cli_env


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_messages_without_tensors_never_import_torch():
    out = _run(
        "import sys, numpy as np\n"
        "import actors.base, coordinator.team\n"
        "from serialization import packb, unpackb, StreamDecoder\n"
        "m = unpackb(packb({'a': np.arange(3), 't': (1, 2.5), 'b': b'x' * 10}))\n"
        "assert m['t'] == (1, 2.5) and m['a'].tolist() == [0, 1, 2]\n"
        "d = StreamDecoder(); d.feed(packb([1, 2])); assert list(d) == [[1, 2]]\n"
        "print('torch' in sys.modules)\n")
    assert out == "False"


def test_a_tensor_message_imports_torch_on_decode(tmp_path):
    path = tmp_path / "msg.bin"
    path.write_bytes(packb({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}))
    out = _run(
        "import sys\n"
        "from serialization import unpackb\n"
        f"m = unpackb(open({str(path)!r}, 'rb').read())\n"
        "print(type(m['w']).__module__, m['w'].dtype, tuple(m['w'].shape), float(m['w'].sum()))\n")
    assert out == "torch torch.bfloat16 (2, 3) 15.0"
