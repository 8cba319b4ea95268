"""The run's ledger in real runs: carried across resumes (local, and s3:// into another directory), the work a
kill -9 lost, a budget that stops the run with a checkpoint, and a closed training window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from greenrun.ckpt import checkpoint
from tests.common import run_cli

pytest_plugins = ["tests.s3_fixtures"]

# A stated 50 W over time: an estimate, labelled so, on a machine without an energy counter.
ESTIMATED = ["energy.sensor=cpu_watts", "energy.cpu_watts=50", "preflight=false", "trainer.log_interval=2"]


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_the_ledger_continues_across_a_resume(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny, *ESTIMATED, "trainer.max_steps=8", f"run.dir={run_dir}"]
    r = run_cli("train", *args, "trainer.stop_at_step=4")
    assert r.returncode == 0, r.stderr[-2000:]
    first = summary(run_dir)["ledger"]
    assert first["energy_source"] == "estimated" and first["kwh"] > 0 and first["tokens"] > 0
    r = run_cli("resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    whole, last = summary(run_dir)["ledger"], [x for x in records(run_dir) if "kwh" in x][-1]
    assert whole["tokens"] == 2 * first["tokens"] and whole["preemption"]["resumes"] == 1
    assert whole["kwh"] > first["kwh"] and whole["train_s"] > first["train_s"]
    assert last["step"] == 8 and last["kwh"] <= whole["kwh"]  # the final save's energy comes after it
    resume = [x for x in records(run_dir) if x.get("event") == "resume"]
    assert resume == [resume[0]] and resume[0]["step"] == 4 and resume[0]["lost_steps"] == 0
    assert resume[0]["wait_s"] >= 0  # from the checkpoint's commit to this process's start


def test_resume_from_the_bucket_into_another_directory_continues_the_ledger(tiny, s3_bucket, tmp_path):
    run_dir = tmp_path / "first" / "ledger-run"
    s3 = ["storage=s3", f"storage.bucket={s3_bucket.name}", f"storage.endpoint_url={s3_bucket.endpoint_url}"]
    r = run_cli(
        "train", *tiny, *ESTIMATED, *s3, "trainer.max_steps=6", "trainer.stop_at_step=3", f"run.dir={run_dir}"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    first = summary(run_dir)["ledger"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = f"s3://{s3_bucket.name}/greenrun/{run_dir.name}"
    r = run_cli("resume", url, f"storage.endpoint_url={s3_bucket.endpoint_url}", tiny[-1], cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = summary(elsewhere / "runs" / run_dir.name)["ledger"]
    assert whole["tokens"] == 2 * first["tokens"] and whole["preemption"]["resumes"] == 1
    assert whole["kwh"] > first["kwh"] and whole["energy_source"] == "estimated"


def test_the_work_a_kill_9_lost_is_counted_as_the_price_of_preemption(tiny, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*tiny, *ESTIMATED, "trainer.log_interval=1", "checkpoint.interval=3", "trainer.max_steps=400"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "greenrun", "train", *args, f"run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # past a committed checkpoint, and a few steps beyond it
            newest = checkpoint.latest_valid(run_dir / "checkpoints")
            steps = [x["step"] for x in records(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
            if newest is not None and steps and max(steps) % 3 == 2 and max(steps) > 5:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    furthest = max(x["step"] for x in records(run_dir))
    saved = checkpoint.latest_valid(run_dir / "checkpoints")
    at = int(checkpoint.read_manifest(saved)["step"])
    assert furthest > at
    r = run_cli("resume", str(run_dir), f"trainer.stop_at_step={at + 2}")
    assert r.returncode == 0, r.stderr[-2000:]
    event = next(x for x in records(run_dir) if x.get("event") == "resume")
    assert event["step"] == at and event["lost_steps"] == furthest - at and event["lost_s"] > 0
    lost = summary(run_dir)["ledger"]["preemption"]
    assert lost["lost_steps"] == furthest - at and lost["lost_kwh"] > 0 and lost["resumes"] == 1


def test_a_spent_budget_stops_the_run_with_a_checkpoint_and_exit_0(tiny, tmp_path):
    run_dir = tmp_path / "budget"
    # A stated 3.6 MW spends a kWh a second, 0.01 kWh in 10 ms: the first logged window (two steps, tens of
    # ms even on a fast idle machine) is over budget.kwh.
    watts = ["energy.cpu_watts=3.6e6", "budget.kwh=0.01", "budget.action=stop"]
    r = run_cli("train", *tiny, *ESTIMATED, *watts, "trainer.max_steps=50", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    result = summary(run_dir)
    assert "budget.kwh" in result["budget_stop"] and result["step"] < 50 and not result["finished"]
    assert "stopping" in r.stderr and "budget.kwh" in r.stderr
    newest = checkpoint.latest_valid(run_dir / "checkpoints")
    assert newest is not None and int(checkpoint.read_manifest(newest)["step"]) == result["step"]


def test_outside_the_training_window_it_checkpoints_and_exits_75(tiny, tmp_path):
    run_dir = tmp_path / "window"
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    hours = f"{later.hour}-{(later.hour + 1) % 24}"  # opens in two hours: closed now
    window = [f"window.hours={hours}", "window.utc=true", "window.outside=exit"]
    r = run_cli("train", *tiny, *ESTIMATED, *window, "trainer.max_steps=6", f"run.dir={run_dir}")
    assert r.returncode == 75, r.stderr[-2000:]
    said = r.stdout + r.stderr
    assert f"outside window.hours={hours}" in said and "greenrun resume" in said
    assert summary(run_dir)["window_exit"] and summary(run_dir)["step"] == 0  # not one step outside it
    assert checkpoint.latest_valid(run_dir / "checkpoints") is not None
