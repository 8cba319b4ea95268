"""greenrun.storage: both backends through the same tests, then S3 failure handling against moto."""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from greenrun.storage import (
    CommitConflict,
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageConfig,
    StorageError,
    build,
    parse_s3_url,
    validate,
)
from greenrun.storage import s3 as s3_backend

if TYPE_CHECKING:  # a runtime import would load the plugin before pytest can rewrite its asserts
    from tests.s3_fixtures import FaultyProxy, S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

MIB = 1024 * 1024
SECRET = "greenrun-test-SECRET-must-never-be-logged-7f3a"


def is_upload_part(method: str, path: str) -> bool:
    return method == "PUT" and "partNumber=" in path


def is_complete(method: str, path: str) -> bool:
    return method == "POST" and "uploadId=" in path


def make_s3(s3: S3Bucket, endpoint_url: str | None = None, **overrides: object) -> S3Storage:
    """S3Storage on the test bucket; endpoint_url is a FaultyProxy's URL, or moto's when None."""
    fields = dict(kind="s3", bucket=s3.name, prefix="runs/r1", retry_mode="standard", part_size_mb=8)
    fields.update(overrides)
    return S3Storage(StorageConfig(**fields, endpoint_url=endpoint_url or s3.endpoint_url))


def write_random(path: Path, size: int, seed: int = 0) -> str:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    s3 = make_s3(request.getfixturevalue("s3_bucket"))
    s3.list_page_size = 7  # several ListObjectsV2 pages from a few dozen keys
    return s3


# --- both backends ---------------------------------------------------------------------------------


def test_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    digest = write_random(src, 100_000)
    assert not storage.exists("ckpt/step_1/model.safetensors")
    storage.put("ckpt/step_1/model.safetensors", src)
    assert storage.exists("ckpt/step_1/model.safetensors")
    dst = tmp_path / "out" / "model.safetensors"
    storage.get("ckpt/step_1/model.safetensors", dst)
    assert sha256_of(dst) == digest
    assert storage.list("ckpt/") == ["ckpt/step_1/model.safetensors"]
    storage.delete("ckpt/step_1/model.safetensors")
    storage.delete("ckpt/step_1/model.safetensors")  # a missing key is fine
    assert not storage.exists("ckpt/step_1/model.safetensors")
    assert storage.list("ckpt/") == []
    with pytest.raises(ObjectNotFound):
        storage.get("ckpt/step_1/model.safetensors", dst)
    assert sha256_of(dst) == digest  # a failed get leaves an existing destination alone
    assert "ckpt/step_1/model.safetensors" in storage.url("ckpt/step_1/model.safetensors")


def test_bytes_round_trip(storage: Storage) -> None:
    storage.put_bytes("manifest.json", b'{"step": 1}')
    assert storage.get_bytes("manifest.json") == b'{"step": 1}'
    storage.put_bytes("manifest.json", b'{"step": 2}')  # unconditional puts overwrite
    assert storage.get_bytes("manifest.json") == b'{"step": 2}'
    storage.put_bytes("empty", b"")
    assert storage.get_bytes("empty") == b""
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("absent")


def test_list_is_sorted_paginated_and_prefix_scoped(storage: Storage) -> None:
    keys = [f"ckpt/step_{i:03d}/shard_{j}" for i in range(12) for j in range(2)]
    for key in random.Random(1).sample(keys, len(keys)):
        storage.put_bytes(key, key.encode())
    storage.put_bytes("metrics.jsonl", b"{}")
    assert storage.list("ckpt/") == sorted(keys)
    assert storage.list("ckpt/step_01") == sorted(k for k in keys if k.startswith("ckpt/step_01"))
    assert storage.list("") == sorted([*keys, "metrics.jsonl"])
    assert storage.list("nothing/") == []


def test_if_none_match_second_writer_conflicts(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("ckpt/step_5/COMMITTED", b"writer-a", if_none_match=True)
    with pytest.raises(CommitConflict):
        storage.put_bytes("ckpt/step_5/COMMITTED", b"writer-b", if_none_match=True)
    src = tmp_path / "commit"
    src.write_bytes(b"writer-c")
    with pytest.raises(CommitConflict):
        storage.put("ckpt/step_5/COMMITTED", src, if_none_match=True)
    assert storage.get_bytes("ckpt/step_5/COMMITTED") == b"writer-a"
    assert storage.abort_stale_uploads("") == 0  # losing writers left nothing behind


def test_if_none_match_race_has_exactly_one_winner(storage: Storage) -> None:
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        try:
            storage.put_bytes("COMMITTED", f"writer-{i}".encode(), if_none_match=True)
            outcomes.append(f"writer-{i}")
        except CommitConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o != "conflict"]
    assert len(outcomes) == 8 and len(winners) == 1
    assert storage.get_bytes("COMMITTED") == winners[0].encode()


@pytest.mark.parametrize("key", ["../x", "/abs", "a\\b", "a\x00b", "a/../b", "a//b", "a/./b", "", "x\n", "ü"])
def test_bad_keys_are_rejected(storage: Storage, tmp_path: Path, key: str) -> None:
    calls = [
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.put(key, tmp_path / "unused"),
        lambda: storage.get_bytes(key),
        lambda: storage.get(key, tmp_path / "dst"),
        lambda: storage.exists(key),
        lambda: storage.delete(key),
        lambda: storage.url(key),
        lambda: storage.set_storage_class(key, "STANDARD_IA"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="invalid storage key") as info:
            call()
        assert repr(key) in str(info.value)
    with pytest.raises(ValueError):
        storage.list(key + "/" if key else "../")


# --- local backend ---------------------------------------------------------------------------------


def test_local_symlink_cannot_escape_root(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="resolves outside"):
        LocalStorage(tmp_path / "store").put_bytes("link/x", b"x")
    assert not (tmp_path / "outside" / "x").exists()


def test_local_interrupted_writes_are_hidden_then_cleaned(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("ckpt/a", b"a")
    (tmp_path / "ckpt" / ".greenrun-tmp-crashed").write_bytes(b"half a checkpoint")
    assert store.list("") == ["ckpt/a"]
    assert store.abort_stale_uploads("ckpt/") == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["a"]


# --- S3: multipart, failures, retries -------------------------------------------------------------


def test_multipart_round_trip_is_byte_identical(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    digest = write_random(src, 20 * MIB + 12345)
    store = make_s3(s3_bucket, part_size_mb=8, max_concurrency=3)
    store.put("ckpt/model.safetensors", src)
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="runs/r1/ckpt/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # went up as three parts of 8, 8 and 4 MiB
    dst = tmp_path / "back.safetensors"
    store.get("ckpt/model.safetensors", dst)
    assert sha256_of(dst) == digest
    assert s3_bucket.open_uploads() == []


def test_multipart_commit_conflict_aborts_the_upload(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = make_s3(s3_bucket)
    store.put_bytes("ckpt/blob", b"first writer")
    src = tmp_path / "blob"
    write_random(src, 9 * MIB)
    with pytest.raises(CommitConflict):  # the 412 comes from CompleteMultipartUpload
        store.put("ckpt/blob", src, if_none_match=True)
    assert s3_bucket.open_uploads() == []
    assert store.get_bytes("ckpt/blob") == b"first writer"


@pytest.mark.parametrize("failing", [is_upload_part, is_complete], ids=["upload_part", "complete"])
def test_failed_multipart_upload_is_aborted(
    s3_bucket: S3Bucket, faulty_proxy, tmp_path: Path, failing
) -> None:
    proxy: FaultyProxy = faulty_proxy(fail_rate=1.0, faults=("slowdown", "reset"), match=failing)
    store = make_s3(s3_bucket, proxy.url, max_attempts=2)
    src = tmp_path / "blob"
    write_random(src, 17 * MIB)
    with pytest.raises(StorageError, match="runs/r1/ckpt/blob"):
        store.put("ckpt/blob", src)
    assert sum(proxy.faults.values()) >= 2  # retries were exhausted, not skipped
    assert s3_bucket.open_uploads() == []
    assert not store.exists("ckpt/blob")


def test_unabortable_upload_is_reported_and_cleaned_at_next_start(
    s3_bucket: S3Bucket, faulty_proxy, fast_backoff, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = faulty_proxy(
        fail_rate=1.0, faults=("slowdown",), match=lambda m, p: is_upload_part(m, p) or m == "DELETE"
    )
    src = tmp_path / "blob"
    write_random(src, 9 * MIB)
    with pytest.raises(StorageError):
        make_s3(s3_bucket, proxy.url, max_attempts=2).put("ckpt/blob", src)
    assert s3_bucket.open_uploads() == ["runs/r1/ckpt/blob"]
    assert "abort_stale_uploads" in caplog.text  # the warning says how the leftover goes away
    # An upload outside the prefix belongs to someone else and must survive.
    s3_bucket.client.create_multipart_upload(Bucket=s3_bucket.name, Key="runs/other/blob")
    assert make_s3(s3_bucket).abort_stale_uploads("ckpt/") == 1
    assert s3_bucket.open_uploads() == ["runs/other/blob"]


def test_round_trips_survive_a_flaky_network(
    s3_bucket: S3Bucket, faulty_proxy, fast_backoff, tmp_path: Path
) -> None:
    proxy = faulty_proxy(fail_rate=0.2, faults=("slowdown", "reset"), seed=7)
    # standard, not the adaptive default: adaptive's client-side rate limiter (see the next test) would
    # spend most of this test waiting. 5 MiB parts keep the multipart payloads small.
    store = make_s3(s3_bucket, proxy.url, prefix="flaky", retry_mode="standard", part_size_mb=5)
    rng = random.Random(7)
    for i in range(30):
        size = rng.randrange(5 * MIB + 1, 12 * MIB) if i % 6 == 0 else rng.randrange(0, 200_000)
        data = rng.randbytes(size)
        digest = hashlib.sha256(data).hexdigest()
        if i % 2:
            store.put_bytes(f"obj/{i}", data)
            assert hashlib.sha256(store.get_bytes(f"obj/{i}")).hexdigest() == digest
        else:
            (tmp_path / "src").write_bytes(data)
            store.put(f"obj/{i}", tmp_path / "src")  # multipart when i % 6 == 0
            store.get(f"obj/{i}", tmp_path / "dst")
            assert sha256_of(tmp_path / "dst") == digest
    assert proxy.faults["slowdown"] > 0 and proxy.faults["reset"] > 0
    assert s3_bucket.open_uploads() == []
    assert len(store.list("obj/")) == 30


def test_adaptive_mode_round_trips_under_throttling(s3_bucket: S3Bucket, faulty_proxy, fast_backoff) -> None:
    # After a SlowDown, adaptive mode caps the whole client's send rate (0.5 requests/s on a fresh
    # client, recovering over seconds), so this stays short and small.
    proxy = faulty_proxy(fail_rate=0.2, faults=("slowdown", "reset"), seed=11)
    store = make_s3(s3_bucket, proxy.url, retry_mode="adaptive")
    payloads = {f"obj/{i}": random.Random(i).randbytes(50_000) for i in range(6)}
    for key, data in payloads.items():
        store.put_bytes(key, data)
    assert {key: store.get_bytes(key) for key in payloads} == payloads
    assert proxy.faults["slowdown"] > 0


def test_lost_answer_to_a_conditional_write_is_not_a_conflict(
    s3_bucket: S3Bucket, faulty_proxy, tmp_path: Path
) -> None:
    # The first PUT and the first CompleteMultipartUpload reach S3, but their answers are lost; the
    # retries then see an existing object. That object is ours, so these commits succeeded.
    proxy = faulty_proxy(
        fail_rate=1.0, faults=("lost_response",), max_faults=1, match=lambda m, p: m == "PUT"
    )
    make_s3(s3_bucket, proxy.url).put_bytes("COMMITTED", b"ours", if_none_match=True)
    assert proxy.faults["lost_response"] == 1
    proxy = faulty_proxy(fail_rate=1.0, faults=("lost_response",), max_faults=1, match=is_complete)
    src = tmp_path / "blob"
    digest = write_random(src, 9 * MIB)
    make_s3(s3_bucket, proxy.url).put("blob", src, if_none_match=True)
    assert proxy.faults["lost_response"] == 1
    make_s3(s3_bucket).get("blob", tmp_path / "back")
    assert sha256_of(tmp_path / "back") == digest
    with pytest.raises(CommitConflict):  # a genuinely different writer still loses
        make_s3(s3_bucket).put_bytes("COMMITTED", b"theirs", if_none_match=True)
    assert s3_bucket.open_uploads() == []


def test_set_storage_class_rewrites_in_place_once(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_s3(s3_bucket)
    store.put_bytes("ckpt/a", b"a" * 1000)
    store.put_bytes("ckpt/b", b"b" * 1000)

    def storage_class(key: str) -> str:
        head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"runs/r1/{key}")
        return head.get("StorageClass", "STANDARD")

    assert "GLACIER_IR" in store.storage_classes()
    assert store.set_storage_class("ckpt/a", "GLACIER_IR") is True
    assert storage_class("ckpt/a") == "GLACIER_IR" and store.get_bytes("ckpt/a") == b"a" * 1000
    assert store.set_storage_class("ckpt/a", "GLACIER_IR") is False  # already there: no copy
    monkeypatch.setattr(s3_backend, "COPY_OBJECT_LIMIT", 0)  # as if ckpt/b were over 5 GiB: managed copy
    assert store.set_storage_class("ckpt/b", "STANDARD_IA") is True
    assert storage_class("ckpt/b") == "STANDARD_IA" and store.get_bytes("ckpt/b") == b"b" * 1000
    assert s3_bucket.open_uploads() == []
    with pytest.raises(ObjectNotFound):
        store.set_storage_class("ckpt/absent", "GLACIER_IR")
    with pytest.raises(ValueError, match="storage class 'COLD'"):
        store.set_storage_class("ckpt/a", "COLD")


def test_local_storage_has_no_storage_classes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("ckpt/a", b"a")
    assert store.storage_classes() == ()
    assert store.set_storage_class("ckpt/a", "GLACIER_IR") is False
    assert store.get_bytes("ckpt/a") == b"a"
    with pytest.raises(ValueError, match="invalid storage key"):
        store.set_storage_class("../a", "GLACIER_IR")


# --- S3: errors and secrets -----------------------------------------------------------------------


def test_secret_stays_out_of_logs_and_errors(
    s3_bucket: S3Bucket, faulty_proxy, tmp_path: Path, caplog, monkeypatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    sdk_loggers = [logging.getLogger(n) for n in ("botocore", "boto3", "urllib3", "s3transfer")]
    saved = [logger.level for logger in sdk_loggers]
    request.addfinalizer(
        lambda: [logger.setLevel(level) for logger, level in zip(sdk_loggers, saved, strict=True)]
    )
    for logger in sdk_loggers:
        logger.setLevel(logging.DEBUG)  # as if someone had turned them up; S3Storage must turn them down
    proxy = faulty_proxy(fail_rate=0.3, faults=("slowdown", "reset"), seed=3)
    store = make_s3(s3_bucket, proxy.url)
    src = tmp_path / "blob"
    write_random(src, 9 * MIB)
    store.put("blob", src)
    store.get("blob", tmp_path / "back")
    store.put_bytes("COMMITTED", b"x", if_none_match=True)
    errors = []
    for call in [
        lambda: store.put_bytes("COMMITTED", b"y", if_none_match=True),
        lambda: store.get_bytes("absent"),
        lambda: make_s3(s3_bucket, bucket="no-such-bucket").put_bytes("x", b"x"),
    ]:
        with pytest.raises((CommitConflict, StorageError)) as info:
            call()
        errors.append(info.value)
    assert "no-such-bucket" in str(errors[2]) and s3_bucket.endpoint_url in str(errors[2])
    assert all(logger.level >= logging.WARNING for logger in sdk_loggers)
    assert not [
        r for r in caplog.records if r.name.startswith(("botocore", "boto3", "urllib3", "s3transfer"))
    ]
    for text in [caplog.text, *(repr(r.args) for r in caplog.records), *map(str, errors)]:
        assert SECRET not in text


def test_missing_credentials_error_points_at_the_default_chain(s3_bucket: S3Bucket, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="default chain") as info:
        make_s3(s3_bucket).put_bytes("x", b"x")
    assert s3_bucket.name in str(info.value)


# --- config ----------------------------------------------------------------------------------------


def test_validate_explains_problems() -> None:
    assert validate(StorageConfig()) == []
    assert validate(StorageConfig(kind="s3", bucket="b", prefix="greenrun/")) == []
    assert (
        "storage.kind: unknown value 'S3' (did you mean s3?)"
        in validate(StorageConfig(kind="S3", bucket="b"))[0]
    )
    assert "did you mean local?" in validate(StorageConfig(kind="locl"))[0]
    assert "storage.bucket is required" in validate(StorageConfig(kind="s3"))[0]
    assert "bare bucket name" in validate(StorageConfig(kind="s3", bucket="s3://b/p"))[0]
    assert "part_size_mb" in validate(StorageConfig(part_size_mb=5))[0]
    assert "retry_mode" in validate(StorageConfig(retry_mode="legacy"))[0]
    assert "storage.prefix" in validate(StorageConfig(prefix="../up"))[0]


def test_build_and_parse_s3_url(tmp_path: Path) -> None:
    local = build(StorageConfig(), tmp_path)
    assert isinstance(local, LocalStorage) and local.root == tmp_path.resolve()
    s3 = build(
        StorageConfig(kind="s3", bucket="b", prefix="/p/", endpoint_url="http://127.0.0.1:1"), tmp_path
    )
    assert isinstance(s3, S3Storage) and s3.url("k") == "s3://b/p/k"
    with pytest.raises(ValueError, match="did you mean local"):
        build(StorageConfig(kind="locla"), tmp_path)
    with pytest.raises(ValueError, match="storage.bucket is required"):
        build(StorageConfig(kind="s3"), tmp_path)
    assert parse_s3_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ["bucket/prefix", "s3:///prefix", "https://bucket/x"]:
        with pytest.raises(ValueError, match="not an S3 URL"):
            parse_s3_url(bad)
