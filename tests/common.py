"""Helpers the test modules share: a tiny fast configuration and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Small enough that a CPU run of a few steps takes seconds, with the real pipeline end to end.
TINY = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.seq_len=32",
    "model.vocab_size=512",
    "data.max_chars=200000",
    "trainer.micro_batch_size=4",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=8",
]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Drive the real console entry point in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "greenrun", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def straight_and_sliced(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The same run twice: straight through, and stopped at step 10 then resumed (for exact-resume checks)."""
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    r = run_cli("train", *args, f"run.dir={straight}")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *args, "trainer.stop_at_step=10", f"run.dir={sliced}")
    assert r.returncode == 0, r.stderr
    r = run_cli("resume", str(sliced))
    assert r.returncode == 0, r.stderr
    return straight, sliced
