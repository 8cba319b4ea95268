"""greenrun.ckpt.remote: checkpoints mirrored to a Storage and back, on both backends, then S3-only behaviour."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.ckpt.remote import Remote, parse_run_url
from greenrun.ckpt.uploader import Uploader
from greenrun.storage import LocalStorage, ObjectNotFound, S3Storage, Storage, StorageConfig, StorageError
from greenrun.storage import s3 as s3_backend

if TYPE_CHECKING:  # a runtime import would load the plugin before pytest can rewrite its asserts
    from tests.s3_fixtures import S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

RUN = "runs/2026-11-22_10-00-00"
MIB = 1024 * 1024
SECRET = "greenrun-remote-SECRET-never-logged-91c2"


def make_s3(s3: S3Bucket, endpoint_url: str | None = None, **overrides: object) -> S3Storage:
    fields = dict(kind="s3", bucket=s3.name, prefix="greenrun", part_size_mb=8) | overrides
    return S3Storage(StorageConfig(**fields, endpoint_url=endpoint_url or s3.endpoint_url))


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "bucket")
    return make_s3(request.getfixturevalue("s3_bucket"))


class Hooked:
    """A Storage that calls hook(op, key) before each write it passes on to the one it wraps."""

    def __init__(self, inner: Storage, hook: Callable[[str, str], None]) -> None:
        self.inner, self.hook = inner, hook

    def put(self, key: str, src: Path, **kwargs: object) -> None:
        self.hook("put", key)
        self.inner.put(key, src, **kwargs)

    def put_bytes(self, key: str, data: bytes, **kwargs: object) -> None:
        self.hook("put_bytes", key)
        self.inner.put_bytes(key, data, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def write_ckpt(
    root: Path, step: int, value: float = 1.0, val_loss: float | None = None, big: int = 0
) -> Path:
    """A small committed local checkpoint; big adds that many bytes of random weights."""
    tensors = {"w": torch.full((4, 3), value), "b": torch.zeros(3)}
    if big:
        tensors["big"] = torch.randn(big // 4, generator=torch.Generator().manual_seed(step))
    snap = checkpoint.Snapshot(
        step=step,
        model=tensors,
        aliases={},
        optimizer={"state": {0: {"exp_avg": torch.ones(2) * value}}, "param_groups": []},
        trainer={"step": step},
        meta={"config_hash": "abc", "val_loss": val_loss},
    )
    return checkpoint.write(snap, root)


def ckpt_keys(storage: Storage, step: int) -> list[str]:
    return storage.list(f"{RUN}/checkpoints/step-{step:08d}/")


# --- both backends -------------------------------------------------------------------------------------


def test_upload_fetch_round_trip(storage: Storage, tmp_path: Path) -> None:
    local = write_ckpt(tmp_path / "local", 5, value=2.0)
    config = tmp_path / "config.yaml"
    config.write_text("model: {n_layer: 2}\n")
    rem = Remote(storage, RUN)
    rem.put_run_file("config.yaml", config)
    result = rem.upload_checkpoint(local)
    assert result.committed and result.step == 5
    assert result.bytes == sum((local / name).stat().st_size for name in checkpoint.FILES)
    assert storage.get_bytes(f"{RUN}/config.yaml") == config.read_bytes()
    prefix = f"{RUN}/checkpoints/step-00000005/"
    assert ckpt_keys(storage, 5) == sorted(
        [prefix + "manifest.json", *(f"{prefix}{rem.attempt}/{name}" for name in checkpoint.FILES)]
    )
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert manifest["attempt"] == rem.attempt and manifest["run_id"] == "2026-11-22_10-00-00"
    assert manifest["files"] == checkpoint.read_manifest(local)["files"]
    assert json.loads(storage.get_bytes(f"{RUN}/LATEST")) == {"step": 5, "attempt": rem.attempt}
    assert Remote(storage, RUN).steps() == [5]

    fetched = Remote(storage, RUN).fetch(5, tmp_path / "fresh")  # another process, another machine
    assert fetched == tmp_path / "fresh" / "step-00000005"
    assert checkpoint.verify(fetched) is None
    for name in checkpoint.FILES:
        assert (fetched / name).read_bytes() == (local / name).read_bytes()
    assert "keys" not in checkpoint.read_manifest(fetched)
    model, _, trainer, _ = checkpoint.load(fetched)
    assert torch.equal(model["w"], torch.full((4, 3), 2.0)) and trainer["step"] == 5
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["step-00000005"]  # no temp dirs left


def test_manifest_is_the_commit(storage: Storage, tmp_path: Path) -> None:
    """A crash after the shards but before the manifest leaves a step nobody reads, and prune clears it."""
    rem = Remote(storage, RUN)
    rem.upload_checkpoint(write_ckpt(tmp_path / "local", 1))

    def crash_at_manifest(op: str, key: str) -> None:
        if key.endswith("manifest.json"):
            raise RuntimeError("preempted")

    crashing = Remote(Hooked(storage, crash_at_manifest), RUN)
    with pytest.raises(RuntimeError, match="preempted"):
        crashing.upload_checkpoint(write_ckpt(tmp_path / "local", 2))
    assert len(ckpt_keys(storage, 2)) == 3  # shards landed, manifest did not
    assert rem.steps() == [1]
    warnings: list[str] = []
    assert rem.fetch_latest_valid(tmp_path / "dst", warn=warnings.append).name == "step-00000001"
    assert warnings == []
    rem.upload_checkpoint(write_ckpt(tmp_path / "local", 3))
    rem.prune(keep_last=5)
    assert ckpt_keys(storage, 2) == []  # the orphan attempt below the newest commit is gone
    assert rem.steps() == [3, 1]


def test_corrupt_or_missing_shards_fall_back(storage: Storage, tmp_path: Path) -> None:
    rem = Remote(storage, RUN)
    for step in (1, 2, 3):
        rem.upload_checkpoint(write_ckpt(tmp_path / "local", step, value=float(step)))
    key = f"{RUN}/checkpoints/step-00000002/{rem.attempt}/model.safetensors"
    blob = bytearray(storage.get_bytes(key))
    blob[len(blob) // 2] ^= 0x01  # one flipped bit, same size: only the sha256 can tell
    storage.put_bytes(key, bytes(blob))
    storage.delete(f"{RUN}/checkpoints/step-00000003/{rem.attempt}/optimizer.pt")
    warnings: list[str] = []
    found = rem.fetch_latest_valid(tmp_path / "dst", warn=warnings.append)
    assert found is not None and found.name == "step-00000001"
    assert len(warnings) == 2
    assert "step-00000003/optimizer.pt: missing" in warnings[0]
    assert "step-00000002/model.safetensors: sha256 does not match" in warnings[1]
    with pytest.raises(CheckpointError, match="sha256"):
        rem.fetch(2, tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["step-00000001"]


def test_second_writer_never_overwrites_a_commit(storage: Storage, tmp_path: Path) -> None:
    first, late = Remote(storage, RUN), Remote(storage, RUN)  # e.g. a zombie of an older attempt
    a3 = write_ckpt(tmp_path / "a", 3, value=1.0)
    first.upload_checkpoint(a3)
    other = late.upload_checkpoint(write_ckpt(tmp_path / "b", 3, value=9.0))
    assert not other.committed and "conflict" in other.note and first.attempt in other.note
    same = late.upload_checkpoint(a3)  # a resumed process redoing the step: identical files
    assert same.committed and same.bytes == 0 and "identical" in same.note

    # The race the existence check cannot see: the other writer commits while this one uploads.
    a4, b4 = write_ckpt(tmp_path / "a", 4, value=1.0), write_ckpt(tmp_path / "b", 4, value=9.0)
    a5 = write_ckpt(tmp_path / "a", 5)
    b5 = shutil.copytree(a5, tmp_path / "c" / a5.name)

    def first_commits(op: str, key: str) -> None:
        if key.endswith("step-00000004/manifest.json"):
            first.upload_checkpoint(a4)
        if key.endswith("step-00000005/manifest.json"):
            first.upload_checkpoint(a5)

    racer = Remote(Hooked(storage, first_commits), RUN, attempt=late.attempt)
    lost = racer.upload_checkpoint(b4)
    assert not lost.committed and "conflict" in lost.note and lost.bytes > 0
    assert not any(late.attempt in key for key in ckpt_keys(storage, 4))  # the loser cleaned up
    fetched = late.fetch(4, tmp_path / "dst")
    assert checkpoint.read_manifest(fetched)["files"] == checkpoint.read_manifest(a4)["files"]
    tied = racer.upload_checkpoint(b5)
    assert tied.committed and "identical" in tied.note
    assert not any(late.attempt in key for key in ckpt_keys(storage, 5))
    assert json.loads(storage.get_bytes(f"{RUN}/checkpoints/step-00000003/manifest.json"))["attempt"] == (
        first.attempt
    )


def test_prune(storage: Storage, tmp_path: Path) -> None:
    rem = Remote(storage, RUN)
    losses = {10: 0.5, 20: 3.0, 30: 0.9, 40: None, 50: 2.0, 60: 4.0}
    for step, loss in losses.items():
        rem.upload_checkpoint(write_ckpt(tmp_path / "local", step, val_loss=loss))
    base = f"{RUN}/checkpoints"
    leftovers = {
        f"{base}/step-00000025/a-crashed/model.safetensors": False,  # no manifest, below the newest: orphan
        f"{base}/step-00000050/a-loser/model.safetensors": False,  # uncommitted attempt of an old step
        f"{base}/step-00000060/a-racing/model.safetensors": True,  # may still be racing for the newest step
        f"{base}/step-00000070/a-next/model.safetensors": True,  # newer than any commit: may be uploading
    }
    for key in leftovers:
        storage.put_bytes(key, b"x")
    assert rem.prune(keep_last=2, keep_best=1, protect={20}) == [30, 40]  # 10 is the best val_loss
    assert rem.steps() == [60, 50, 20, 10]
    assert {key: storage.exists(key) for key in leftovers} == leftovers
    assert ckpt_keys(storage, 30) == ckpt_keys(storage, 40) == []
    assert rem.prune(keep_last=0) == [10, 20, 50]  # the newest survives even keep_last=0
    assert rem.steps() == [60]
    assert rem.fetch_latest_valid(tmp_path / "dst").name == "step-00000060"
    if isinstance(storage, LocalStorage):  # no empty directories left behind
        assert sorted(p.name for p in (storage.root / base).iterdir()) == ["step-00000060", "step-00000070"]


def test_data_cache_round_trip(storage: Storage, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "0123456789abcdef"
    cache.mkdir(parents=True)
    (cache / "tokenizer.json").write_text('{"model": "bpe"}')
    for name, tokens in (("train-00000.bin", 100), ("train-00001.bin", 7), ("val-00000.bin", 20)):
        (cache / name).write_bytes(bytes(range(256)) * (tokens * 2 // 256) + b"\1" * (tokens * 2 % 256))
    meta = {
        "key": "0123456789abcdef" + "0" * 48,
        "dtype": "uint16",
        "shards": {"train": [100, 7], "val": [20]},
    }
    (cache / "meta.json").write_text(json.dumps(meta))
    rem = Remote(storage, RUN)
    assert rem.upload_data_cache(cache) is True
    assert rem.upload_data_cache(cache) is False  # uploaded once per run
    with pytest.raises(ObjectNotFound):
        rem.download_data_cache("fedcba9876543210", tmp_path / "fresh")

    got = Remote(storage, RUN).download_data_cache("0123456789abcdef", tmp_path / "fresh")
    assert got == tmp_path / "fresh" / "0123456789abcdef"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in cache.iterdir())
    assert all((got / p.name).read_bytes() == p.read_bytes() for p in cache.iterdir())
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["0123456789abcdef"]

    storage.put_bytes(f"{RUN}/data/0123456789abcdef/val-00000.bin", b"\0" * 10)  # truncated remotely
    with pytest.raises(StorageError, match="val-00000.bin"):
        rem.download_data_cache("0123456789abcdef", tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


# --- background uploads --------------------------------------------------------------------------------


def test_uploader_coalesces_and_never_blocks(tmp_path: Path) -> None:
    started = threading.Event()

    def slow(op: str, key: str) -> None:
        started.set()
        time.sleep(0.15)

    store = LocalStorage(tmp_path / "bucket")
    rem = Remote(Hooked(store, slow), RUN)
    dirs = [write_ckpt(tmp_path / "local", step) for step in (1, 2, 3)]
    uploader = Uploader(rem)
    took = []
    for i, path in enumerate(dirs):
        t0 = time.perf_counter()
        uploader.submit(path)
        took.append(time.perf_counter() - t0)
        if i == 0:
            assert started.wait(5)  # step 1 is now in flight
    assert max(took) < 0.05, took
    assert uploader.in_flight_steps() == {1, 3}
    assert uploader.wait(timeout=30)
    assert uploader.close(timeout=5)
    assert Remote(store, RUN).steps() == [3, 1]
    notes = {r.step: r for r in uploader.results}
    assert notes[1].committed and notes[3].committed and not notes[2].committed
    assert notes[2].note == "upload of step 2 skipped: step 3 is newer"
    assert uploader.in_flight_steps() == set()


def test_uploader_survives_a_failed_upload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failures = [RuntimeError("disk on fire")]

    def flaky(op: str, key: str) -> None:
        if failures:
            raise failures.pop()

    rem = Remote(Hooked(LocalStorage(tmp_path / "bucket"), flaky), RUN)
    uploader = Uploader(rem)
    with caplog.at_level(logging.WARNING, logger="greenrun.ckpt.remote"):
        uploader.submit(write_ckpt(tmp_path / "local", 1))
        assert uploader.wait(10)
        uploader.submit(write_ckpt(tmp_path / "local", 2))
        assert uploader.wait(10)
    assert uploader.close(5)
    first, second = uploader.results
    assert not first.committed and "disk on fire" in first.note
    assert second.committed and rem.steps() == [2]
    assert len(caplog.records) == 1 and "step-00000001/manifest.json" in caplog.text


def test_failed_s3_upload_logs_no_credentials(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uploader = Uploader(Remote(make_s3(s3_bucket, bucket="no-such-bucket", max_attempts=1), RUN))
    with caplog.at_level(logging.DEBUG):
        uploader.submit(write_ckpt(tmp_path / "local", 1))
        assert uploader.close(30)
    (result,) = uploader.results
    assert not result.committed and "no-such-bucket" in result.note
    assert "s3://no-such-bucket/greenrun/runs/" in caplog.text
    assert SECRET not in caplog.text and SECRET not in result.note


# --- S3 only ---------------------------------------------------------------------------------------------


def storage_classes(s3: S3Bucket, rem: Remote, step: int) -> set[str]:
    keys = json.loads(rem.storage.get_bytes(rem.manifest_key(step)))["keys"].values()
    heads = [s3.client.head_object(Bucket=s3.name, Key=f"greenrun/{key}") for key in keys]
    return {head.get("StorageClass", "STANDARD") for head in heads}


def test_archive_moves_only_old_checkpoints(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rem = Remote(make_s3(s3_bucket), RUN)
    for step, loss in {1: 0.9, 2: 0.5, 3: 1.0, 4: 2.0}.items():
        rem.upload_checkpoint(write_ckpt(tmp_path / "local", step, val_loss=loss))
    assert rem.archive(older_than_days=7) == []  # nothing is a week old yet
    later = time.time() + 10 * 86400
    assert rem.archive(older_than_days=7, now=later) == [1, 3]  # 4 is the newest, 2 the best
    assert [storage_classes(s3_bucket, rem, step) for step in (1, 2, 3, 4)] == [
        {"GLACIER_IR"},
        {"STANDARD"},
        {"GLACIER_IR"},
        {"STANDARD"},
    ]
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"greenrun/{rem.manifest_key(1)}")
    assert head.get("StorageClass", "STANDARD") == "STANDARD"  # manifests stay hot for listing
    assert rem.archive(older_than_days=7, now=later) == []  # idempotent
    assert checkpoint.verify(rem.fetch(1, tmp_path / "dst")) is None  # GLACIER_IR reads like any object

    monkeypatch.setattr(s3_backend, "COPY_OBJECT_LIMIT", 0)  # every object through the managed (>5 GiB) copy
    assert rem.archive(older_than_days=7, storage_class="STANDARD_IA", now=later) == [1, 3]
    assert storage_classes(s3_bucket, rem, 3) == {"STANDARD_IA"}
    with pytest.raises(ValueError, match="GLACIER"):
        rem.archive(older_than_days=7, storage_class="DEEP_ARCHIVE")
    with caplog.at_level(logging.INFO, logger="greenrun.ckpt.remote"):
        assert Remote(LocalStorage(tmp_path / "bucket"), RUN).archive(older_than_days=0) == []
    assert "nothing to do" in caplog.text


def test_uploads_commit_through_a_flaky_network(
    s3_bucket: S3Bucket, faulty_proxy, fast_backoff, tmp_path: Path
) -> None:
    proxy = faulty_proxy(fail_rate=0.2, faults=("slowdown", "reset", "lost_response"), seed=11)
    rem = Remote(make_s3(s3_bucket, proxy.url, part_size_mb=8), RUN)
    uploader = Uploader(rem)
    for step in (1, 2, 3):  # step 2 carries a 17 MiB tensor: three multipart parts of 8, 8 and ~1 MiB
        uploader.submit(write_ckpt(tmp_path / "local", step, big=17 * MIB if step == 2 else 0))
        assert uploader.wait(timeout=60)
    assert uploader.close(5)
    assert [r.committed for r in uploader.results] == [True, True, True], [r.note for r in uploader.results]
    assert sum(proxy.faults.values()) > 0
    assert s3_bucket.open_uploads() == []
    direct = Remote(make_s3(s3_bucket), RUN)
    key = json.loads(direct.storage.get_bytes(direct.manifest_key(2)))["keys"]["model.safetensors"]
    etag = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"greenrun/{key}")["ETag"]
    assert etag.strip('"').endswith("-3")
    assert direct.steps() == [3, 2, 1]
    for step in (1, 2, 3):
        assert checkpoint.verify(direct.fetch(step, tmp_path / "dst")) is None


def test_lost_multipart_start_leaves_no_open_upload(
    s3_bucket: S3Bucket, faulty_proxy, fast_backoff, tmp_path: Path
) -> None:
    """A lost answer to CreateMultipartUpload makes the retry open a second upload; the first must go."""
    proxy = faulty_proxy(
        fail_rate=1.0,
        faults=("lost_response",),
        max_faults=1,
        match=lambda m, p: m == "POST" and p.endswith("?uploads"),
    )
    rem = Remote(make_s3(s3_bucket, proxy.url), RUN)
    assert rem.upload_checkpoint(write_ckpt(tmp_path / "local", 1, big=9 * MIB)).committed
    assert proxy.faults["lost_response"] == 1
    assert s3_bucket.open_uploads() == []


def test_parse_run_url() -> None:
    assert parse_run_url("s3://bucket/greenrun/2026-11-22_10-00-00/") == (
        "bucket",
        "greenrun/2026-11-22_10-00-00",
    )
    for bad in ("s3://bucket", "s3://bucket/", "https://bucket/run", "s3://bucket/a/../b"):
        with pytest.raises(ValueError):
            parse_run_url(bad)
