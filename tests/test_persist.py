"""The save pipeline: training blocks only for the snapshot; commits, pruning and uploads happen behind it."""

import threading
import time

import torch

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig
from greenrun.ckpt.pipeline import Persister


def snap(step: int, val: float | None = None) -> checkpoint.Snapshot:
    return checkpoint.Snapshot(
        step=step,
        model={"w": torch.full((64, 64), float(step))},
        aliases={},
        optimizer={"state": {}, "param_groups": []},
        trainer={"step": step},
        meta={"val_loss": val},
    )


class SlowUploader:
    def __init__(self, delay: float):
        self.delay, self.submitted, self.done = delay, [], threading.Event()

    def submit(self, path):
        self.submitted.append(path.name)

    def in_flight_steps(self):
        return set()

    def wait(self, timeout=None):
        return self.done.wait(timeout)

    def close(self, timeout=None):
        return True


def test_save_commits_in_background_and_prunes(tmp_path):
    p = Persister(CheckpointConfig(keep_last=2), tmp_path, note=lambda _: None)
    for step in (1, 2, 3):
        p.save(lambda s=step: snap(s))
    p.close()
    assert [d.name for d in checkpoint.committed(tmp_path)] == ["step-00000003", "step-00000002"]
    assert len(p.blocked_s) == 3


def test_keep_best_survives_pruning(tmp_path):
    p = Persister(CheckpointConfig(keep_last=1, keep_best=1), tmp_path, note=lambda _: None)
    for step, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)):
        p.save(lambda s=step, v=val: snap(s, v))
    p.close()
    assert sorted(d.name for d in checkpoint.committed(tmp_path)) == ["step-00000002", "step-00000004"]


def test_write_errors_surface_on_the_training_thread(tmp_path, monkeypatch):
    p = Persister(CheckpointConfig(), tmp_path, note=lambda _: None)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write", boom)
    p.save(lambda: snap(1))
    try:
        p.save(lambda: snap(2))
    except OSError as e:
        assert "disk full" in str(e)
    else:
        raise AssertionError("the background write error was swallowed")


def test_emergency_commits_and_reports_a_late_upload(tmp_path):
    up = SlowUploader(delay=10)
    p = Persister(CheckpointConfig(), tmp_path, uploader=up, note=lambda _: None)
    t0 = time.perf_counter()
    msg = p.emergency(lambda: snap(7), seconds_left=lambda: 2.5)
    assert time.perf_counter() - t0 < 2.0
    assert checkpoint.verify(checkpoint.step_dir(tmp_path, 7)) is None
    assert up.submitted == ["step-00000007"]
    assert "not committed remotely" in msg
    up.done.set()
    assert "uploaded" in p.emergency(lambda: snap(8), seconds_left=lambda: 5.0)


def test_stale_temp_dirs_are_cleaned_on_start(tmp_path):
    (tmp_path / ".tmp-step-00000003-dead").mkdir(parents=True)
    notes = []
    Persister(CheckpointConfig(), tmp_path, note=notes.append)
    assert not (tmp_path / ".tmp-step-00000003-dead").exists() and notes
