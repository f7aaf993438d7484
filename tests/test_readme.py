"""The README's quickstart stays true: two commands, and CI runs the second one verbatim."""

import re

from tests.conftest import ROOT


def _block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert m, f"README lacks the {marker} block"
    return m.group(1).strip()


def test_quickstart_has_two_single_commands():
    run, test = _block("quickstart-run"), _block("quickstart-test")
    assert "\n" not in run and "\n" not in test
    assert "pip install" in run and "agentforge run" in run
    assert "pip install" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _block("quickstart-test") in ci.splitlines()
