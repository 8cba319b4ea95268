"""ruff lint and format stay clean: the style is part of the build, not a suggestion."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    # ruff is a test dependency: run it through this interpreter (an unactivated venv has no ruff on PATH,
    # and skipping then let lint errors pass). Missing, it skips locally but fails in CI.
    if importlib.util.find_spec("ruff") is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed: pip install -e '.[test]'")
        pytest.skip("ruff not installed (pip install -e '.[test]')")
    # Virtual environments in the checkout (.venv-ci/ of .ci/run) are git-ignored, which ruff honours only
    # inside a git clone: exclude them by name as well.
    cmd = [sys.executable, "-m", "ruff", *args, "--extend-exclude", ".venv*"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
