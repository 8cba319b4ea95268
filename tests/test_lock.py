"""One writer per run directory: the flock, its holder's pid and host, stale-by-construction, and cleanup.

The lock is held by real processes here: a small Python child for the mechanics, the real CLI for two writers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greenrun.ckpt import checkpoint
from greenrun.core import lock
from greenrun.core.fs import UnsafePath
from tests.common import TINY, run_cli

HOLDER = """
import sys, time
from greenrun.core import lock
lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def start_holder(directory: Path) -> subprocess.Popen:
    """A child process that takes the lock of `directory` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_host(tmp_path):
    holder = start_holder(tmp_path / "run")
    try:
        with pytest.raises(lock.Busy) as e:
            lock.acquire(tmp_path / "run")
        assert f"pid {holder.pid} on host {lock.hostname()}" in str(e.value)
        assert e.value.holder["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: nothing stale to clean up by hand.
    with lock.acquire(tmp_path / "run"):
        assert lock.held(tmp_path / "run")
    assert not lock.held(tmp_path / "run")


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    outer = lock.acquire(tmp_path)
    inner = lock.acquire(tmp_path)
    inner.release()
    assert lock.held(tmp_path)  # the outer hold still stands
    outer.release()
    outer.release()  # a second release is a no-op
    assert not lock.held(tmp_path)


def test_a_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / lock.LOCK_NAME).symlink_to(target)
    with pytest.raises(UnsafePath):
        lock.acquire(tmp_path / "run")
    assert target.read_text() == "keep me"


def test_clean_stale_removes_only_dirs_whose_writer_is_gone(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    host = lock.hostname()
    names = {
        "dead": f".tmp-step-00000001-0a0b0c0d-{dead.pid}@{host}",
        "live": f".tmp-step-00000002-0a0b0c0d-{live.pid}@{host}",
        "mine": f".tmp-step-00000003-0a0b0c0d-{os.getpid()}@{host}",
        "elsewhere": f".tmp-step-00000004-0a0b0c0d-{dead.pid}@another-host.example",
        "legacy": ".tmp-step-00000005-0a0b0c0d",
    }
    try:
        for name in names.values():
            (ckpts / name).mkdir()
        removed = {p.name for p in checkpoint.clean_stale(ckpts)}
        assert removed == {names["dead"], names["legacy"]}
        assert {p.name for p in ckpts.iterdir()} == {names["live"], names["mine"], names["elsewhere"]}
        # While another process holds the run directory, cleanup touches nothing at all.
        (ckpts / names["legacy"]).mkdir()
        holder = start_holder(tmp_path / "run")
        try:
            assert checkpoint.clean_stale(ckpts) == []
            assert (ckpts / names["legacy"]).is_dir()
        finally:
            holder.kill()
            holder.wait()
    finally:
        live.kill()
        live.wait()


def test_checkpoint_temp_dirs_carry_the_writers_pid_and_host(tmp_path):
    name = checkpoint.temp_dir(tmp_path, "step-00000007").name
    assert name.startswith(".tmp-step-00000007-") and name.endswith(f"-{os.getpid()}@{lock.hostname()}")
    assert not checkpoint.writer_gone(name)  # this process is alive


def _metrics_lines(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_two_writers_on_one_run_dir_the_second_is_refused_the_first_finishes(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # Many steps with a checkpoint at each: the first writer always has a live temp dir to lose.
    steps = ["trainer.max_steps=800", "checkpoint.interval=1", "trainer.log_interval=1", "preflight=false"]
    common = [*TINY, f"data.cache_dir={cache_dir}", *steps, f"run.dir={run_dir}"]
    logs = tmp_path / "first.err"
    with open(logs, "w") as err:
        first = subprocess.Popen(
            [sys.executable, "-m", "greenrun", "train", *common],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 180
        while _metrics_lines(run_dir) < 3:  # training, so the lock is held and checkpoints are being written
            assert first.poll() is None, logs.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first writer did not start training"
            time.sleep(0.05)
        second = run_cli("train", *common, env={"OMP_NUM_THREADS": "1"})
        again = run_cli("resume", str(run_dir), env={"OMP_NUM_THREADS": "1"})
        assert first.poll() is None, "the first writer finished before the second tried: raise max_steps"
        for r in (second, again):
            assert r.returncode == 2, r.stderr[-3000:]
            assert f"pid {first.pid} on host {lock.hostname()}" in r.stderr, r.stderr[-3000:]
            assert "Traceback" not in r.stderr
        assert first.wait(timeout=300) == 0, logs.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    final = checkpoint.step_dir(run_dir / "checkpoints", 800)
    assert checkpoint.verify(final) is None
    assert (run_dir / "summary.json").is_file()
    # Once the first has exited its lock is gone: the same directory continues (nothing left to train).
    r = run_cli("train", *common, "resume=auto", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
