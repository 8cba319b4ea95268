"""Upload health: storage.max_failed_uploads failed checkpoint uploads in a row warn once (loudly, naming the
bucket and its newest checkpoint) or, with storage.on_failed_uploads=stop, set Checkpointer.upload_stop; a
committed upload resets both. The newest verified checkpoint in the bucket survives retention meanwhile."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from greenrun import config, storage
from greenrun.ckpt import checkpoint
from greenrun.ckpt.pipeline import Checkpointer
from greenrun.ckpt.remote import COMMITTED, FAILED, Remote
from greenrun.ckpt.retention import Retention
from greenrun.ckpt.uploader import Uploader
from greenrun.runtime.budget import UploadHealth
from greenrun.storage import S3Storage, Storage, StorageConfig, StorageError

if TYPE_CHECKING:  # a runtime import would load the plugin before pytest can rewrite its asserts
    from tests.s3_fixtures import FaultyProxy, S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

RUN = "2026-11-22_10-00-00"
SECRET = "greenrun-health-SECRET-never-logged-5d1e"


def make_s3(bucket: str, endpoint_url: str, **overrides: object) -> S3Storage:
    fields = dict(kind="s3", bucket=bucket, prefix="greenrun", part_size_mb=8, max_attempts=1) | overrides
    return S3Storage(StorageConfig(**fields, endpoint_url=endpoint_url))


def snapshot(step: int) -> checkpoint.Snapshot:
    return checkpoint.Snapshot(
        step=step,
        model={"w": torch.full((4, 3), float(step))},
        aliases={},
        optimizer={"state": {}, "param_groups": []},
        trainer={"step": step},
        meta={"config_hash": "abc", "val_loss": None},
    )


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failing:
    """A Storage whose writes raise while `fail(op, key)` says so; `lose_answer(key)`: the write lands, and
    the caller hears an error anyway (a lost response)."""

    def __init__(
        self,
        inner: Storage,
        fail: Callable[[str], bool] = lambda key: False,
        lose_answer: Callable[[str], bool] = lambda key: False,
    ) -> None:
        self.inner, self.fail, self.lose_answer = inner, fail, lose_answer

    def _write(self, write: Callable[[], None], key: str) -> None:
        if self.fail(key):
            raise StorageError(f"injected failure writing {key}")
        write()
        if self.lose_answer(key):
            raise StorageError(f"injected lost answer writing {key}")

    def put(self, key: str, src: Path, **kwargs: object) -> None:
        self._write(lambda: self.inner.put(key, src, **kwargs), key)

    def put_bytes(self, key: str, data: bytes, **kwargs: object) -> None:
        self._write(lambda: self.inner.put_bytes(key, data, **kwargs), key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def upload(uploader: Uploader, root: Path, step: int) -> str:
    """Write a committed local checkpoint, hand it over, wait for its outcome."""
    uploader.submit(checkpoint.write(snapshot(step), root))
    assert uploader.wait(60)
    (result,) = [r for r in uploader.results if r.step == step]
    return result.outcome


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- validation -----------------------------------------------------------------------------------------


def test_the_keys_are_validated_with_the_storage_group() -> None:
    ok = StorageConfig(kind="s3", bucket="b")
    assert (ok.max_failed_uploads, ok.on_failed_uploads) == (3, "warn")
    assert storage.validate(ok) == []
    assert (
        storage.validate(StorageConfig(kind="s3", bucket="b", max_failed_uploads=0, on_failed_uploads="stop"))
        == []
    )
    problems = storage.validate(
        StorageConfig(kind="s3", bucket="b", max_failed_uploads=-1, on_failed_uploads="halt")
    )
    assert [p.split(":")[0] for p in problems] == ["storage.on_failed_uploads", "storage.max_failed_uploads"]
    assert "choose one of warn, stop" in problems[0] and "0 = never act" in problems[1]
    cfg = config.apply_overrides(config.Config(), ["storage.max_failed_uploads=-2"])
    with pytest.raises(config.ConfigError, match="storage.max_failed_uploads"):
        config.validate(cfg, check_device=False, need_corpus=False)
    with pytest.raises(Exception, match="max_failed_uploads"):  # a wrong type fails at composition
        config.apply_overrides(config.Config(), ["storage.max_failed_uploads=many"])


# --- warn, stop, reset -----------------------------------------------------------------------------------


def test_failures_warn_once_per_limit_and_a_commit_resets(
    s3_bucket: S3Bucket,
    faulty_proxy: Callable[..., FaultyProxy],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    proxy = faulty_proxy(fail_rate=0.0, faults=("slowdown",))  # 503 SlowDown on every request once it fails
    uploader = Uploader(Remote(make_s3(s3_bucket.name, proxy.url), RUN), health=UploadHealth(2, "warn"))
    ckpt = Checkpointer(checkpoint.CheckpointConfig(), tmp_path / "ckpt", uploader=uploader)
    with caplog.at_level(logging.WARNING):
        assert upload(uploader, tmp_path / "local", 1) == COMMITTED
        proxy.fail_rate = 1.0
        assert upload(uploader, tmp_path / "local", 2) == FAILED
        assert loud(caplog) == []  # one failure is not yet the limit
        assert upload(uploader, tmp_path / "local", 3) == FAILED
        (warning,) = loud(caplog)
        assert upload(uploader, tmp_path / "local", 4) == FAILED
        assert len(loud(caplog)) == 1  # rate-limited: again only after another max_failed_uploads failures
        assert ckpt.upload_stop is None  # warn never stops
        proxy.fail_rate = 0.0
        assert upload(uploader, tmp_path / "local", 5) == COMMITTED
    assert uploader.close(10)
    assert warning.startswith("2 checkpoint uploads failed in a row (storage.max_failed_uploads=2)")
    assert f"s3://{s3_bucket.name}/greenrun/{RUN} is not taking checkpoints" in warning
    assert (
        "spending money" in warning and "nothing newer than step 1 (s3://" in warning
    )  # the newest checkpoint safe there
    assert (
        "storage.endpoint_url" in warning
        and "default chain" in warning
        and "on_failed_uploads=stop" in warning
    )
    assert uploader.health.failed == 0 and "checkpoint uploads succeed again" in caplog.text
    assert SECRET not in caplog.text
    assert uploader.report(5)["upload_stop"] is None


def test_stop_sets_the_checkpointers_flag_until_an_upload_commits(
    s3_bucket: S3Bucket,
    faulty_proxy: Callable[..., FaultyProxy],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = faulty_proxy(fail_rate=1.0, faults=("slowdown",))
    uploader = Uploader(Remote(make_s3(s3_bucket.name, proxy.url), RUN), health=UploadHealth(2, "stop"))
    ckpt = Checkpointer(checkpoint.CheckpointConfig(), tmp_path / "ckpt", uploader=uploader)
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            assert ckpt.upload_stop is None
            ckpt.save(lambda step=step: snapshot(step), wait=True)
            assert uploader.wait(60)
        reason = ckpt.upload_stop
        assert reason is not None and reason.startswith("2 checkpoint uploads failed in a row")
        ckpt.save(lambda: snapshot(3), wait=True)  # the loop commits one more before it exits
        assert uploader.wait(60)
        assert ckpt.upload_stop == reason
        (stopping,) = loud(caplog)  # logged once, not at every later failure
        assert ckpt.remote_report()["upload_stop"] == reason
        proxy.fail_rate = 0.0
        ckpt.save(lambda: snapshot(4), wait=True)
        assert uploader.wait(60)
    assert (
        "stopping (storage.on_failed_uploads=stop)" in stopping
        and "no checkpoint of it off this machine" in stopping
    )
    assert ckpt.upload_stop is None and uploader.health.failed == 0
    ckpt.close()
    assert [r.outcome for r in uploader.results] == [FAILED, FAILED, FAILED, COMMITTED]


def test_an_unreachable_endpoint_stops_through_the_checkpointer(
    tmp_path: Path, aws_credentials: None
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    uploader = Uploader(Remote(make_s3("greenrun-test", endpoint), RUN), health=UploadHealth(3, "stop"))
    ckpt = Checkpointer(
        checkpoint.CheckpointConfig(interval=1, keep_last=5), tmp_path / "ckpt", uploader=uploader
    )
    for step in (1, 2, 3):
        assert ckpt.upload_stop is None
        assert ckpt.maybe_save(step, lambda step=step: snapshot(step))
        ckpt._join()  # the local commit, then the upload's outcome
        assert uploader.wait(60)
    assert ckpt.upload_stop is not None and "3 checkpoint uploads failed in a row" in ckpt.upload_stop
    assert all(endpoint in r.note for r in uploader.results)  # the note names the endpoint it could not reach
    ckpt.close(upload_timeout=5)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"step-{s:08d}" for s in (1, 2, 3)]


def test_no_health_or_zero_never_acts(
    s3_bucket: S3Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for health in (None, UploadHealth(0, "stop")):
        gone = make_s3("no-such-bucket", s3_bucket.endpoint_url)
        uploader = Uploader(Remote(gone, RUN), health=health)
        with caplog.at_level(logging.WARNING):
            for step in (1, 2, 3, 4):
                assert upload(uploader, tmp_path / "local", step) == FAILED
        assert uploader.stop_reason is None and loud(caplog) == []
        assert uploader.close(10)


# --- retention while uploads fail -------------------------------------------------------------------------


def test_retention_keeps_the_newest_verified_checkpoint_while_uploads_fail(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    failing: set[int] = set()

    def step_of(key: str) -> int | None:
        part = next((p for p in key.split("/") if p.startswith("step-")), None)
        return int(part[5:]) if part else None

    store = make_s3(s3_bucket.name, s3_bucket.endpoint_url)
    broken = Failing(
        store,
        fail=lambda key: step_of(key) in failing and not key.endswith("manifest.json") and step_of(key) != 4,
        # Step 4's manifest lands, but the answer is lost: this process counts it as failed.
        lose_answer=lambda key: step_of(key) == 4 and key.endswith("manifest.json"),
    )
    remote = Remote(broken, RUN)
    uploader = Uploader(remote, Retention(keep_last=1), health=UploadHealth(2, "stop"))
    assert upload(uploader, tmp_path / "local", 1) == COMMITTED
    assert upload(uploader, tmp_path / "local", 2) == COMMITTED
    assert remote.steps() == [2]  # keep_last=1 pruned step 1 after step 2 committed
    failing |= {3, 4, 5}
    for step in (3, 4, 5):
        assert upload(uploader, tmp_path / "local", step) == FAILED
    assert uploader.stop_reason is not None
    assert uploader.close(10)
    # What job.train does at the end of the run, with the same Retention: nothing verified goes.
    remote.prune(keep_last=1)
    assert remote.steps() == [4, 2]  # 4: its manifest landed after all its files; 2: the newest verified
    assert store.list(f"{RUN}/checkpoints/step-00000003/") == []  # the failed attempts' files are cleaned
    assert store.list(f"{RUN}/checkpoints/step-00000005/") == []
    fetched = Remote(store, RUN).fetch_latest_valid(tmp_path / "dst")
    assert fetched is not None and fetched.name == "step-00000004"
    assert Remote(store, RUN)._manifest(2)["step"] == 2  # still committed, its files in place
    assert checkpoint.verify(Remote(store, RUN).fetch(2, tmp_path / "dst2")) is None
