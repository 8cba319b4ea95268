"""A wheel installed into a fresh virtual environment finds its configs and recipes from any directory, and CI
runs the README's set-up commands."""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run that shows the command's output when it fails (check=True alone hides it)."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _running_site_dirs() -> list[str]:
    """The site-packages directories of the interpreter running the tests, venv or not.

    site.getsitepackages() follows a venv's own prefix (and the base one only with --system-site-packages);
    sysconfig's purelib/platlib cover interpreters where site lists none; the user site counts when enabled.
    """
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    seen: list[str] = []
    for d in dirs:
        p = Path(d).resolve()
        # Never lend the checkout itself (a venv inside it, like .venv/, is fine): the wheel must be imported.
        if p.is_dir() and str(p) not in seen and p != REPO:
            seen.append(str(p))
    return seen


@pytest.mark.slow
def test_wheel_runs_smoke_outside_the_repository(tmp_path, cache_dir):
    # Build from a clean copy: an in-tree build reuses the checkout's build/lib, where modules that have since
    # moved or been deleted linger and would ship in the wheel (and it would write into the checkout).
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv*",
            "build",
            "dist",
            "runs",
            "outputs",
            "multirun",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
        ),
    )
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(src),
        ]
    )
    wheel = next(dist.glob("greenrun-*.whl"))
    venv = tmp_path / "venv"
    # A venv of its own (no system site packages: from inside a venv those would be the *base* interpreter's,
    # without torch). The running environment's packages are lent to it by a .pth file, which appends its
    # site-packages directories after the venv's own, so the installed wheel shadows any checkout. Plain path
    # lines do not run the .pth files in those directories, so an editable greenrun there stays invisible.
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    venv_site = _run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    (Path(venv_site) / "_greenrun_test_lend.pth").write_text("\n".join(_running_site_dirs()) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [
            str(py),
            "-c",
            "import greenrun, greenrun.config as c; print(greenrun.__file__, c.conf_dir(), c.recipes_dir())",
        ],
        cwd=elsewhere,
    ).stdout
    assert str(venv) in where and str(REPO) not in where
    r = subprocess.run(
        [
            str(venv / "bin" / "greenrun"),
            "smoke",
            "model=tiny",
            "data.max_chars=200000",
            "model.vocab_size=512",
            f"data.cache_dir={cache_dir}",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    r = subprocess.run(
        [str(venv / "bin" / "greenrun"), "train", "+recipe=bf16_ckpt", "--cfg", "job"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "policy: full" in r.stdout, r.stderr


README_VENV = "python3 -m venv .venv && . .venv/bin/activate && "
CI_VENV = "python3 -m venv --clear .venv-ci && . .venv-ci/bin/activate"


def test_ci_runs_the_readme_setup_commands_in_a_fresh_venv():
    """The README's set-up is two commands, the first making a venv; .ci/run runs both verbatim in its own."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    install, tests = commands
    assert install.startswith(README_VENV) and install.endswith("greenrun train"), install
    assert "torch==2.13.0" in install and "pytest" in tests, commands
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "set -euo pipefail" in ci
    assert CI_VENV in ci, ci
    assert ci[ci.index(CI_VENV) + 1 :] == [install.removeprefix(README_VENV), tests]
