"""`agentforge drill` as a user runs it: an embedded Ray, faults injected, a report and a verdict."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import agentforge_cmd, cli_env


@pytest.mark.slow
def test_drill_passes_and_reports(tmp_path):
    # a 3 x 4 graph (the default is 4 x 5): the CLI path, faults and report; slow (about 30 s on 2
    # cores); the drill itself runs in the default run in tests/chaos/test_drill.py
    proc = subprocess.run([*agentforge_cmd(), "drill", "--chaos", "kill_rate=0.25,raise_rate=0.1,seed=3",
                           "--layers", "3", "--width", "4", "--out", "drill", "--json"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["passed"] and report["tasks"] == 12 and report["mismatched"] == []
    assert report["chaos"]["kill_rate"] == 0.25 and report["faults_injected"].get("kill", 0) >= 1
    assert json.loads((tmp_path / "drill" / "drill.json").read_text()) == report


def test_drill_refuses_a_bad_chaos_flag(tmp_path):
    proc = subprocess.run([*agentforge_cmd(), "drill", "--chaos", "kill_rate=2"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "chaos.kill_rate" in proc.stderr
