"""A wheel installed into a fresh virtual environment finds its configs and recipes from any directory."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_runs_smoke_outside_the_repository(tmp_path, cache_dir):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("greenrun-*.whl"))
    venv = tmp_path / "venv"
    # System site-packages lend torch and friends; the venv's own greenrun (the wheel) shadows any checkout.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import greenrun, greenrun.config as c; print(greenrun.__file__, c.conf_dir(), c.recipes_dir())",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
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
