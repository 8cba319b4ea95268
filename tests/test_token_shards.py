"""Token shards: tokenise once, reuse, rebuild only what changed, survive interruption, and travel through S3.

Shards here are tiny (data.group_bytes a few KiB) so that every file of a handmade corpus is its own group.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from greenrun import data
from greenrun.data import DataConfig, build, cache, index, shards
from greenrun.data.dataset import Joined

if TYPE_CHECKING:
    from tests.s3_fixtures import S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

GROUP = 2048  # text bytes per shard: each corpus file below is larger, so it ends a group of its own


def _corpus(root: Path, n: int = 5, lines: int = 120) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n):
        (root / f"doc{f}.txt").write_text(
            "".join(f"def f{f}_{i}(x):\n    return x * {i}\n" for i in range(lines))
        )
    return root


def _cfg(root: Path, corpus: Path, **kw) -> DataConfig:
    kw = {"tokenizer": "bytes", "group_bytes": GROUP, "workers": 1, "max_chars": 0, "shard_tokens": 5000} | kw
    return DataConfig(source="text", paths=[str(corpus / "*.txt")], cache_dir=str(root / "cache"), **kw)


def _stream(ds: data.Dataset) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in ds.shards["train"] + ds.shards["val"]])


def _store_mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "cache" / "shards").glob("*.bin")}


# --- reuse and partial rebuild ---------------------------------------------------------------------------


def test_every_file_feeds_its_own_shard_and_a_rebuild_reuses_them(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    ds = build(_cfg(tmp_path, corpus), 300)
    assert len(ds.meta["files"]) == 5 and ds.meta["build"]["tokenized"] == [0, 1, 2, 3, 4]
    assert [f["documents"] for f in ds.meta["files"]] == [1] * 5
    assert all(index.sha256_of(ds.cache_path / f["name"]) == f["sha256"] for f in ds.meta["files"])
    again = build(_cfg(tmp_path, corpus), 300)
    assert again.cache_path == ds.cache_path and again.meta["build"] == ds.meta["build"]  # not rebuilt
    (ds.cache_path / "meta.json").unlink()  # the index lost: the shards are still in the store
    rebuilt = build(_cfg(tmp_path, corpus), 300)
    assert rebuilt.meta["build"]["tokenized"] == [] and rebuilt.meta["build"]["reused"] == 5


def test_a_changed_file_rebuilds_only_its_shard(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    before = build(_cfg(tmp_path, corpus), 300)
    mtimes = _store_mtimes(tmp_path)
    with open(corpus / "doc2.txt", "a") as fh:
        fh.write("def added(x):\n    return x\n")
    after = build(_cfg(tmp_path, corpus), 300)
    assert after.cache_key != before.cache_key
    assert after.meta["build"]["tokenized"] == [2] and after.meta["build"]["reused"] == 4
    kept = {n: t for n, t in _store_mtimes(tmp_path).items() if n in mtimes}
    assert kept == mtimes  # the old shards were not touched, the new one sits beside them
    fresh = build(_cfg(tmp_path / "elsewhere", corpus), 300)  # a build from nothing gives the same cache
    assert fresh.cache_key == after.cache_key and np.array_equal(_stream(fresh), _stream(after))
    for step in range(3):
        assert torch.equal(
            fresh.batch("train", step, 0, 4, 64, 7)[0], after.batch("train", step, 0, 4, 64, 7)[0]
        )


def test_group_boundaries_depend_only_on_the_records_around_them() -> None:
    records = [(f"r{i}", f"record {i} " * (10 + i % 7)) for i in range(400)]
    base = shards.plan(records, 400)
    edited = list(records)
    edited[200] = ("r200", "an edited record " * 9)
    changed = shards.plan(edited, 400)
    assert len(base.groups) > 20
    a = {g.fingerprint for g in base.groups}
    b = {g.fingerprint for g in changed.groups}
    assert len(a - b) <= 2 and len(b - a) <= 2  # the edited record's group (and at most a neighbour)


def test_parallel_workers_write_the_same_shards(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    one = build(_cfg(tmp_path / "one", corpus, tokenizer="bpe"), 320)
    two = build(_cfg(tmp_path / "two", corpus, tokenizer="bpe", workers=2), 320)
    assert two.meta["build"]["workers"] == 2 and two.cache_key == one.cache_key
    assert [f["sha256"] for f in two.meta["files"]] == [f["sha256"] for f in one.meta["files"]]


# --- interruption ----------------------------------------------------------------------------------------


def _no_complete_cache(root: Path) -> None:
    for entry in (root / "cache").iterdir():
        if entry.is_dir() and entry.name != "shards":
            assert not (entry / "meta.json").exists(), f"{entry} looks complete"
            assert entry.name.startswith(".build-"), entry


def test_a_worker_failing_midway_keeps_finished_shards_and_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = _corpus(tmp_path / "corpus")
    real, calls = shards.encode_group, []

    def third_fails(texts, store, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in a worker")
        return real(texts, store, name)

    monkeypatch.setattr(shards, "encode_group", third_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        build(_cfg(tmp_path, corpus), 300)
    _no_complete_cache(tmp_path)
    assert not list((tmp_path / "cache").glob(".build-*"))  # the temp dir went with the exception
    assert len(list((tmp_path / "cache" / "shards").glob("*.json"))) == 2
    monkeypatch.setattr(shards, "encode_group", real)
    ds = build(_cfg(tmp_path, corpus), 300)
    assert ds.meta["build"]["reused"] == 2 and len(ds.meta["build"]["tokenized"]) == 3


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "sigint"])
def test_killing_a_build_never_leaves_a_cache_taken_as_complete(tmp_path: Path, how: signal.Signals) -> None:
    corpus = _corpus(tmp_path / "corpus", n=400, lines=60)
    code = (
        "from greenrun.data import DataConfig, build\n"
        f"cfg = DataConfig(source='text', paths=[{str(corpus / '*.txt')!r}], cache_dir={str(tmp_path / 'cache')!r},"
        f" tokenizer='bytes', group_bytes={GROUP}, workers=2, max_chars=0)\n"
        "build(cfg, 300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    store, deadline = tmp_path / "cache" / "shards", time.monotonic() + 60
    while time.monotonic() < deadline and len(list(store.glob("*.json")) if store.is_dir() else []) < 3:
        time.sleep(0.01)
    proc.send_signal(how)
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    _no_complete_cache(tmp_path)
    ds = build(DataConfig(source="text", paths=[str(corpus / "*.txt")], cache_dir=str(tmp_path / "cache"),
                          tokenizer="bytes", group_bytes=GROUP, workers=1, max_chars=0), 300)  # fmt: skip
    assert ds.meta["build"]["reused"] >= 3 and ds.train_tokens > 0
    assert sum(f["documents"] for f in ds.meta["files"]) == 400


# --- the index: segments across shard files, and the layout before shard files -------------------------------


def test_segments_cut_the_concatenated_stream_and_may_span_files() -> None:
    train, val, segments = index.split_segments([5, 0, 7, 3], 0.2, 4)
    assert (train, val) == (12, 3)
    assert segments["train"] == [[[0, 0, 4]], [[0, 4, 1], [2, 0, 3]], [[2, 3, 4]]]
    assert segments["val"] == [[[3, 0, 3]]]


def test_a_joined_segment_reads_like_one_array() -> None:
    parts = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 15)]
    joined, whole = Joined(parts), np.arange(15)
    assert len(joined) == 15 and np.array_equal(np.asarray(joined), whole)
    for sl in (slice(0, 15), slice(3, 9), slice(6, 8), slice(2, 15, 4), slice(11, 13), slice(14, 99)):
        assert np.array_equal(joined[sl], whole[sl]), sl


def test_windows_may_cross_shard_files_inside_a_segment(tmp_path: Path) -> None:
    ds = build(_cfg(tmp_path, _corpus(tmp_path / "corpus"), shard_tokens=1 << 20), 300)
    assert len(ds.shards["train"]) == 1 and isinstance(ds.shards["train"][0], Joined)
    stream = _stream(ds)
    for step in range(10):
        x, y = ds.batch("train", step, 0, 8, 300, 0)
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            starts = np.flatnonzero(stream[: ds.train_tokens - 300] == row[0])
            assert any(np.array_equal(stream[s : s + 301], row) for s in starts)


def test_a_cache_in_the_layout_before_shard_files_still_loads(tmp_path: Path) -> None:
    ds = build(_cfg(tmp_path, _corpus(tmp_path / "corpus")), 300)
    old = tmp_path / "old" / ds.cache_path.name
    old.mkdir(parents=True)
    (old / "tokenizer.json").write_bytes((ds.cache_path / "tokenizer.json").read_bytes())
    meta = {k: v for k, v in ds.meta.items() if k not in ("layout", "files", "segments")}
    for split, segments in ds.shards.items():
        for i, segment in enumerate(segments):
            np.asarray(segment).tofile(old / f"{split}-{i:05d}.bin")
    (old / "meta.json").write_text(json.dumps(meta))
    legacy = data.Dataset(old)
    assert index.problem(old, meta) is None
    for step in range(3):
        assert torch.equal(legacy.batch("val", step, 1, 2, 32, 5)[0], ds.batch("val", step, 1, 2, 32, 5)[0])


# --- the cache in S3 --------------------------------------------------------------------------------------


def test_a_fresh_machine_downloads_the_cache_instead_of_tokenising(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = _corpus(tmp_path / "corpus")
    url = f"s3://{s3_bucket.name}/tokens"
    kw = {"cache_url": url, "cache_endpoint_url": s3_bucket.endpoint_url, "tokenizer": "bpe"}
    built = build(_cfg(tmp_path / "a", corpus, **kw), 320)
    listed = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="tokens/")["Contents"]
    keys = sorted(o["Key"].removeprefix(f"tokens/{built.cache_path.name}/") for o in listed)
    assert keys == sorted(["meta.json", "tokenizer.json"] + [f["name"] for f in built.meta["files"]])

    def no_work(*_):
        raise AssertionError("tokenised although the bucket has the cache")

    monkeypatch.setattr(shards, "encode_group", no_work)
    monkeypatch.setattr(data.tokenizer.Bpe, "train", no_work)
    fetched = build(_cfg(tmp_path / "b", corpus, **kw), 320)
    assert fetched.cache_key == built.cache_key and fetched.cache_path != built.cache_path
    assert np.array_equal(_stream(fetched), _stream(built))
    assert torch.equal(fetched.batch("train", 4, 0, 4, 64, 3)[0], built.batch("train", 4, 0, 4, 64, 3)[0])


def test_a_damaged_download_is_rebuilt_here(
    tmp_path: Path, s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = _corpus(tmp_path / "corpus")
    kw = {"cache_url": f"s3://{s3_bucket.name}", "cache_endpoint_url": s3_bucket.endpoint_url}
    built = build(_cfg(tmp_path / "a", corpus, **kw), 300)
    key = f"{built.cache_path.name}/shard-00001.bin"
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(len(body)))  # same size, zeros
    with caplog.at_level("WARNING", logger="greenrun"):
        again = build(_cfg(tmp_path / "b", corpus, **kw), 300)
    assert "shard-00001.bin does not match its sha256" in caplog.text
    assert again.meta["build"]["tokenized"] == [0, 1, 2, 3, 4]  # built here, not taken from the bucket
    assert not list((tmp_path / "b" / "cache").glob(".download-*"))


def test_an_unreachable_bucket_never_stops_a_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, aws_credentials: None, fast_backoff: None
) -> None:
    kw = {"cache_url": "s3://nowhere/x", "cache_endpoint_url": "http://127.0.0.1:9"}
    with caplog.at_level("WARNING", logger="greenrun"):
        ds = build(_cfg(tmp_path, _corpus(tmp_path / "corpus", n=1), **kw), 300)
    assert ds.train_tokens > 0 and "data.cache_url=s3://nowhere/x" in caplog.text


def test_cache_url_problems_are_collected() -> None:
    problems = data.validate(DataConfig(cache_url="gs://b/x", cache_endpoint_url="ftp://x"))
    assert (
        problems[0].startswith("data.cache_url: not an S3 URL") and "data.cache_endpoint_url" in problems[1]
    )
    assert cache.validate(DataConfig(cache_url="s3://bucket/tokens")) == []
