"""The save pipeline: training blocks only for the snapshot; commits, pruning and uploads happen behind it."""

import logging
import threading
import time

import pytest
import torch

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig
from greenrun.ckpt.pipeline import Checkpointer
from greenrun.ckpt.remote import Remote
from greenrun.ckpt.uploader import Uploader
from greenrun.storage import LocalStorage


def snap(step: int, val: float | None = None) -> checkpoint.Snapshot:
    return checkpoint.Snapshot(
        step=step,
        model={"w": torch.full((64, 64), float(step))},
        aliases={},
        optimizer={"state": {}, "param_groups": []},
        trainer={"step": step},
        meta={"val_loss": val},
    )


class SlowStorage:
    """LocalStorage whose checkpoint file writes wait until `fast` is set (or 10 s)."""

    def __init__(self, root):
        self.inner, self.fast = LocalStorage(root), threading.Event()

    def put_bytes(self, key, data, **kwargs):
        if not key.endswith(("manifest.json", "LATEST")):
            self.fast.wait(10)
        self.inner.put_bytes(key, data, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_save_commits_in_background_and_prunes(tmp_path):
    p = Checkpointer(CheckpointConfig(keep_last=2), tmp_path)
    for step in (1, 2, 3):
        p.save(lambda s=step: snap(s))
    p.close()
    assert [d.name for d in checkpoint.committed(tmp_path)] == ["step-00000003", "step-00000002"]
    assert len(p.blocked_s) == 3


def test_keep_best_survives_pruning(tmp_path):
    p = Checkpointer(CheckpointConfig(keep_last=1, keep_best=1), tmp_path)
    for step, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)):
        p.save(lambda s=step, v=val: snap(s, v))
    p.close()
    assert sorted(d.name for d in checkpoint.committed(tmp_path)) == ["step-00000002", "step-00000004"]


def test_write_errors_surface_on_the_training_thread(tmp_path, monkeypatch):
    p = Checkpointer(CheckpointConfig(), tmp_path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write", boom)
    p.save(lambda: snap(1))
    with pytest.raises(OSError, match="disk full"):  # not swallowed by the background thread
        p.save(lambda: snap(2))


def test_emergency_commits_and_reports_a_late_upload(tmp_path):
    store = SlowStorage(tmp_path / "bucket")
    up = Uploader(Remote(store, "run"))
    p = Checkpointer(CheckpointConfig(), tmp_path / "ckpt", uploader=up)
    t0 = time.perf_counter()
    done = p.emergency(lambda: snap(7), seconds_left=lambda: 2.5)
    msg = done.message
    assert time.perf_counter() - t0 < 2.0
    assert checkpoint.verify(checkpoint.step_dir(tmp_path / "ckpt", 7)) is None
    assert [(r.step, r.outcome) for r in up.results] == [(7, "failed")]  # the upload of step 7, abandoned
    assert "not committed remotely" in msg
    assert done.where == "local" and done.exit_code == 77
    store.fast.set()
    done = p.emergency(lambda: snap(8), seconds_left=lambda: 5.0)
    msg = done.message
    assert "uploaded" in msg and "not committed" not in msg
    assert done.where == "bucket" and done.exit_code == 75
    assert Remote(store.inner, "run").steps() == [8]
    assert store.inner.list("run/checkpoints/step-00000007/") == []  # the abandoned upload left nothing


def test_stale_temp_dirs_are_cleaned_on_start(tmp_path, caplog):
    (tmp_path / ".tmp-step-00000003-dead").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="greenrun.ckpt.pipeline"):
        Checkpointer(CheckpointConfig(), tmp_path)
    assert not (tmp_path / ".tmp-step-00000003-dead").exists()
    assert "removed 1 unfinished checkpoint temp dir" in caplog.text


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_checkpointer_decides_when_to_save_by_steps(tmp_path):
    p = Checkpointer(CheckpointConfig(interval=3), tmp_path)
    saved = [step for step in range(1, 10) if p.maybe_save(step, lambda s=step: snap(s))]
    p.close()
    assert saved == [3, 6, 9]
    assert [d.name for d in checkpoint.committed(tmp_path)] == ["step-00000009", "step-00000006"]


def test_the_checkpointer_decides_when_to_save_by_wall_clock(tmp_path):
    clock = Clock()
    p = Checkpointer(CheckpointConfig(interval=0, every_minutes=2.0), tmp_path, clock=clock)
    saved = []
    for step in range(1, 8):
        clock.now += 50.0  # 50 s per step: a save is due every 120 s since the last one
        if p.maybe_save(step, lambda s=step: snap(s)):
            saved.append(step)
    p.close()
    assert saved == [3, 6]


def test_every_rank_saves_when_any_rank_finds_a_save_due(tmp_path):
    """`agree` stands for the all-reduce: a rank whose own view says no still joins the save."""
    asked = []

    def agree(due: bool) -> bool:
        asked.append(due)
        return True

    follower = Checkpointer(CheckpointConfig(interval=100), tmp_path, writer=False, agree=agree)
    assert follower.maybe_save(5, lambda: pytest.fail("a non-writer rank must not snapshot")) is True
    assert asked == [False]
    assert checkpoint.committed(tmp_path) == [] and follower.blocked_s == []
