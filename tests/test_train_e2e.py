"""`greenrun smoke` and `greenrun train` end to end through the CLI on the CPU."""

import json

from greenrun.ckpt import checkpoint
from tests.common import run_cli

# What the preflight (the smoke check before training) prints: its verdict and the memory prediction.
PREFLIGHT_LINES = ("smoke PASS", "predicted peak")


def preflight_ran(stdout: str) -> bool:
    found = [line in stdout for line in PREFLIGHT_LINES]
    assert all(found) or not any(found), f"half a preflight report:\n{stdout}"
    return all(found)


def test_smoke_passes_and_reports_memory(tiny):
    r = run_cli("smoke", *tiny)
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and "parameters" in r.stdout and "predicted peak" in r.stdout
    assert "fits: " in r.stdout  # held against the training device: this RAM, or the GPU of a GPU machine


def test_smoke_fails_cleanly_with_exit_1(tiny):
    # A learning rate that blows the weights up after one step: the second loss is not finite.
    r = run_cli("smoke", *tiny, "optimizer.lr=1e30", "schedule.warmup_steps=0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "not finite" in r.stdout
    assert "Traceback" not in r.stderr


def test_train_writes_the_run_directory(tiny, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(
        "train",
        *tiny,
        "trainer.max_steps=6",
        "trainer.eval_interval=3",
        "trainer.log_interval=2",
        "checkpoint.interval=2",
        "checkpoint.keep_last=2",
        f"run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and "greenrun summary" in r.stdout and "sample:" in r.stdout
    assert preflight_ran(r.stdout), "preflight defaults to true: a train run starts with the smoke check"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 2, 3, 4, 6]
    for row in rows[1:]:
        assert {"step", "loss", "lr", "tokens", "tok_per_s"} <= row.keys()
    assert "val_loss" in rows[0] and "val_loss" in rows[2] and "val_loss" in rows[-1]
    assert (run_dir / "config.yaml").read_text().count("max_steps: 6") == 1
    names = [p.name for p in checkpoint.committed(run_dir / "checkpoints")]
    assert names == ["step-00000006", "step-00000004"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["sample"]


def test_multirun_sweep_makes_one_run_per_value(tiny, tmp_path):
    r = run_cli(
        "train",
        "-m",
        *tiny,
        "precision=fp32,bf16",
        "trainer.max_steps=2",
        "preflight=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert r.returncode == 0, r.stderr
    assert not preflight_ran(r.stdout), "preflight=false still ran the preflight"
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert "name: bf16" in (tmp_path / "sweep" / "1" / "config.yaml").read_text()
    # Each job's result names its overrides, and a final table compares the jobs.
    assert "sweep job 0 (precision=fp32" in r.stdout and "sweep job 1 (precision=bf16" in r.stdout
    table = r.stdout[r.stdout.rindex("overrides") :]
    assert "val loss" in table and "tok/s" in table
    for job, prec in (("0", "fp32"), ("1", "bf16")):
        summary = json.loads((tmp_path / "sweep" / job / "summary.json").read_text())
        row = next(line for line in table.splitlines() if f"precision={prec}" in line)
        assert f"{summary['val_loss']:.4f}" in row and str(tmp_path / "sweep" / job) in row


def test_append_and_delete_overrides(tiny, tmp_path):
    # `~key` deletes what set the key before it (here an earlier override; usually a recipe) and the schema
    # default (preflight: true) comes back. Were `~preflight` ignored, preflight=false would hold: no preflight.
    r = run_cli(
        "train",
        *tiny,
        "+recipe=bf16_ckpt",
        "preflight=false",
        "~preflight",
        "trainer.max_steps=1",
        f"run.dir={tmp_path / 'r'}",
    )
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r" / "config.yaml").read_text()
    assert "policy: full" in text and "preflight: true" in text
    assert preflight_ran(r.stdout), "~preflight did not delete preflight=false"
