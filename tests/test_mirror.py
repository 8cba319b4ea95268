"""The mirror (greenrun.runs): besides config.yaml and the checkpoints, a bucket run gets metrics.jsonl after each
committed checkpoint and summary.json when the uploader closes, so `greenrun report s3://…` reads it; and the
mirror is best-effort, never a reason for training to fail."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from greenrun import config, runs
from greenrun.ckpt import checkpoint
from greenrun.ckpt.remote import COMMITTED
from greenrun.report.load import load as load_run
from greenrun.report.load import load_dir
from tests.common import run_cli

if TYPE_CHECKING:  # a runtime import would load the plugin before pytest can rewrite its asserts
    from tests.s3_fixtures import S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

RECORDS = [{"step": 1, "loss": 5.5, "lr": 1e-3}, {"step": 2, "loss": 5.0, "lr": 1e-3}]


def s3_config(s3: S3Bucket, run_dir: Path) -> config.Config:
    return config.apply_overrides(
        config.Config(),
        [
            "storage.kind=s3",
            f"storage.bucket={s3.name}",
            "storage.prefix=greenrun",
            f"storage.endpoint_url={s3.endpoint_url}",
            f"run.dir={run_dir}",
        ],
    )


def token_cache(root: Path) -> Path:
    cache = root / "0123456789abcdef"
    cache.mkdir(parents=True)
    (cache / "meta.json").write_text("{}")
    return cache


def commit(run_dir: Path, step: int) -> Path:
    snap = checkpoint.Snapshot(
        step=step,
        model={"w": torch.ones(2)},
        aliases={},
        optimizer={"state": {}, "param_groups": []},
        trainer={"step": step},
        meta={"config_hash": "abc", "val_loss": None},
    )
    return checkpoint.write(snap, run_dir / "checkpoints")


def bucket_text(s3: S3Bucket, key: str) -> str:
    return s3.client.get_object(Bucket=s3.name, Key=f"greenrun/{key}")["Body"].read().decode()


def test_a_bucket_run_carries_its_metrics_and_summary_for_the_report(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    run_dir = tmp_path / "2026-11-22_10-00-00"
    run_dir.mkdir()
    cfg = s3_config(s3_bucket, run_dir)
    (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS)
    (run_dir / "metrics.jsonl").write_text(lines + '{"step": 3, "lo')  # a line training is writing now
    remote = runs.open_remote(cfg, run_dir)
    uploader = runs.start_mirror(remote, run_dir, token_cache(tmp_path / "cache"), cfg)
    uploader.submit(commit(run_dir, 2))
    assert uploader.wait(60)
    assert [r.outcome for r in uploader.results] == [COMMITTED]
    assert bucket_text(s3_bucket, f"{run_dir.name}/metrics.jsonl") == lines  # complete lines only
    assert not remote.storage.exists(f"{run_dir.name}/summary.json")  # not written yet
    summary = {"step": 2, "finished": True, "energy": {"kwh": 0.25}}
    (run_dir / "summary.json").write_text(json.dumps(summary))  # job.train writes it before the close
    assert uploader.close(30)
    assert json.loads(bucket_text(s3_bucket, f"{run_dir.name}/summary.json")) == summary

    run = load_run(
        f"s3://{s3_bucket.name}/greenrun/{run_dir.name}", [f"storage.endpoint_url={s3_bucket.endpoint_url}"]
    )
    assert run.name == run_dir.name and run.records == RECORDS and run.summary == summary
    assert run.config["storage"]["bucket"] == s3_bucket.name


def test_the_mirror_never_raises(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = s3_config(s3_bucket, run_dir)
    (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
    remote = runs.open_remote(cfg, run_dir)
    assert runs.mirror_run_files(remote, run_dir) == []  # nothing written yet: nothing to send, no noise
    (run_dir / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (tmp_path / "elsewhere.json").write_text("{}")
    (run_dir / "summary.json").symlink_to(tmp_path / "elsewhere.json")  # never sent through a link
    with caplog.at_level(logging.WARNING, logger="greenrun.runs"):
        assert runs.mirror_run_files(remote, run_dir) == ["metrics.jsonl"]
    assert "summary.json is a symlink" in caplog.text

    def down(*args: object, **kwargs: object) -> None:
        raise runs.storage.StorageUnreachable("could not connect to the endpoint")

    monkeypatch.setattr(remote.storage, "put_bytes", down)
    with caplog.at_level(logging.WARNING, logger="greenrun.runs"):
        assert runs.mirror_run_files(remote, run_dir) == []
    assert "could not mirror" in caplog.text and "could not connect" in caplog.text
    monkeypatch.undo()

    uploader = runs.start_mirror(remote, run_dir, token_cache(tmp_path / "cache"), cfg)
    monkeypatch.setattr(uploader, "run_files", lambda cancel: 1 / 0)  # even a bug in it stays on its thread
    uploader.submit(commit(run_dir, 1))
    assert uploader.wait(60) and uploader.close(10)
    assert [r.outcome for r in uploader.results] == [COMMITTED]


def test_greenrun_report_reads_a_trained_bucket_run(
    tiny: list[str], s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    run_dir = tmp_path / "bucket-run"
    s3 = ["storage=s3", f"storage.bucket={s3_bucket.name}", f"storage.endpoint_url={s3_bucket.endpoint_url}"]
    r = run_cli("train", *tiny, *s3, "trainer.max_steps=6", "checkpoint.interval=3", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-4000:]
    run = load_run(
        f"s3://{s3_bucket.name}/greenrun/{run_dir.name}", [f"storage.endpoint_url={s3_bucket.endpoint_url}"]
    )
    here = load_dir(run_dir)
    assert run.records == here.records and [r["step"] for r in run.records][-1] == 6
    assert run.summary == here.summary and run.summary["step"] == 6
