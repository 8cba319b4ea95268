"""`greenrun train trainer.nproc_per_node=N`: one start, N gloo processes on the CPU through torch's elastic
launcher; a killed process restarts the group from the newest checkpoint, a SIGTERM to one process stops every
rank at one emergency checkpoint (exit 75), and bad launcher keys are usage errors (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from greenrun import config, launch
from greenrun.ckpt import checkpoint
from tests.common import run_cli

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch without torch.distributed"
)

TWO = ["trainer.nproc_per_node=2", "trainer.device=cpu", "trainer.log_interval=1"]


def steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row["step"] for row in map(json.loads, lines) if "event" not in row]


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """The CLI in the background, its output in a file (a pipe nobody reads would block it)."""
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "greenrun", "train", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, out


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's children (the workers carry RANK in their environment)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(stat.parent.name)
    return found


def wait_until(what, proc: subprocess.Popen, out: Path, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if found := what():
            return found
        assert proc.poll() is None, f"exited {proc.returncode} too early:\n{out.read_text()[-3000:]}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out:\n{out.read_text()[-3000:]}")


def finish(proc: subprocess.Popen, out: Path, timeout: float = 180.0) -> tuple[int, str]:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, out.read_text()


def test_two_processes_from_one_start(tiny, tmp_path):
    run_dir = tmp_path / "two"
    r = run_cli("train", *tiny, *TWO, "trainer.max_steps=3", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("smoke PASS") == 1  # the preflight ran once, in the launcher
    assert steps(run_dir) == [0, 1, 2, 3]  # one writer: no duplicated lines
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == 3 * 4 * 32 * 2  # steps x micro x seq x world
    [ckpt] = checkpoint.committed(run_dir / "checkpoints")
    manifest = checkpoint.read_manifest(ckpt)
    assert manifest["step"] == 3 and manifest["world_size"] == 2
    # config.yaml is the launcher's, with the preflight marked done, and the config the workers trained with.
    saved = config.load_yaml(run_dir / "config.yaml")
    assert saved.trainer.nproc_per_node == 2 and saved.preflight is False
    assert config.hash_matches(saved, manifest["config_hash"])
    assert r.stdout.count("greenrun summary") == 1


def test_two_agents_on_this_machine_rendezvous_as_two_nodes(tiny, tmp_path):
    # Two machines, simulated: two launchers (torch's elastic agents) meet at one c10d endpoint, one process
    # each, and train one run in the run.dir they share; the second node's rank writes nothing.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "nodes"
    node = ["trainer.nnodes=2", "trainer.nproc_per_node=1", f"trainer.rdzv_endpoint=127.0.0.1:{port}"]
    args = [
        *tiny,
        *node,
        "trainer.device=cpu",
        "trainer.log_interval=1",
        "trainer.max_steps=3",
        "preflight=false",
    ]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    procs = [start(tmp_path / d, *args, f"run.dir={run_dir}") for d in ("a", "b")]
    results = [finish(proc, out) for proc, out in procs]
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert steps(run_dir) == [0, 1, 2, 3]
    assert checkpoint.read_manifest(checkpoint.committed(run_dir / "checkpoints")[0])["world_size"] == 2
    assert sum(text.count("greenrun summary") for _, text in results) == 1


def test_a_killed_process_restarts_the_group_from_the_newest_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "restart"
    args = [*TWO, "trainer.max_steps=120", "trainer.eval_interval=1000", "checkpoint.interval=4"]
    proc, out = start(
        tmp_path, *tiny, *args, "trainer.max_restarts=1", "preflight=false", f"run.dir={run_dir}"
    )
    wait_until(lambda: checkpoint.committed(run_dir / "checkpoints"), proc, out)
    victim = wait_until(lambda: workers(proc.pid).get(1), proc, out)
    os.kill(victim, signal.SIGKILL)
    code, text = finish(proc, out)
    assert code == 0, text[-4000:]
    counts = Counter(steps(run_dir))
    assert sorted(counts) == list(range(121)) and set(counts.values()) == {1}, text[-3000:]
    assert checkpoint.read_manifest(checkpoint.committed(run_dir / "checkpoints")[0])["step"] == 120
    assert "resumed from" in text


def test_sigterm_to_one_process_stops_every_rank_at_one_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "stop"
    args = [*TWO, "trainer.max_steps=100000", "trainer.eval_interval=100000", "checkpoint.interval=0"]
    proc, out = start(tmp_path, *tiny, *args, "preflight=false", f"run.dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and metrics.read_text().count("\n") > 3, proc, out)
    os.kill(wait_until(lambda: workers(proc.pid).get(1), proc, out), signal.SIGTERM)
    code, text = finish(proc, out)
    assert code == 75, text[-4000:]
    [ckpt] = checkpoint.committed(run_dir / "checkpoints")
    step = checkpoint.read_manifest(ckpt)["step"]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == step
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "preempt"] == [step]
    assert "rank 0 exited 75" in text


@pytest.mark.parametrize("bad", ["trainer.nproc_per_node=0", "trainer.nnodes=abc"])
def test_bad_launcher_keys_are_one_usage_error(tiny, tmp_path, bad):
    r = run_cli("train", *tiny, bad, f"run.dir={tmp_path / 'bad'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("configuration error") == 1 and bad.partition("=")[0] in r.stderr
    assert not (tmp_path / "bad").exists()


# --- in-process: the plan and the exit code ------------------------------------------------------------


def test_layout_launches_only_when_asked_and_never_under_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = config.apply_overrides(config.Config(), ["trainer.device=cpu"])
    assert launch.layout(cfg) is None  # today's single process
    auto = config.apply_overrides(cfg, ["trainer.nproc_per_node=auto"])
    assert launch.layout(auto) is None  # a CPU: one process
    two = config.apply_overrides(cfg, ["trainer.nproc_per_node=2", "trainer.max_restarts=1"])
    assert launch.layout(two) == launch.Layout(2, 1, 1, "", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.layout(two) is None


def test_the_exit_code_is_the_workers():
    assert launch.outcome({0: 0, 1: 0}, {}, None) == (0, "")
    # Rank 0 wrote the emergency checkpoint: its word, whatever the agent did to the others after.
    assert launch.outcome({0: 75}, {1: (-15, 11)}, 1)[0] == 75
    assert launch.outcome({0: 77, 1: 75}, {0: (77, 10), 1: (75, 11)}, 1)[0] == 77
    code, message = launch.outcome({0: 1}, {1: (-9, 11), 0: (1, 10)}, 1)
    assert code == 1 and message.startswith("rank 1 (pid 11) was killed by SIGKILL")
    assert launch.outcome({0: 2, 1: 2}, {0: (2, 10), 1: (2, 11)}, 0)[0] == 2
    assert launch.outcome({}, {1: (139, 11)}, 1)[0] == 1
