"""Durability is reported as it is: what reached the bucket, exit codes that say so, a deadline that holds.

The CLI runs in real subprocesses against moto on 127.0.0.1; a slow link is a TCP proxy that throttles what
the client sends. Exit codes: 0 finished and safe in the bucket, 75 preempted and the emergency checkpoint is
committed in the bucket, 76 aborted, 77 the newest checkpoint is on this machine's disk only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from greenrun.ckpt import checkpoint, emergency
from greenrun.ckpt.emergency import Staged
from greenrun.ckpt.remote import Remote, UploadResult
from greenrun.ckpt.uploader import Uploader, describe
from greenrun.runtime.spot import SpotConfig
from greenrun.storage import LocalStorage, S3Storage, Storage, StorageConfig
from greenrun.storage.base import StorageAccessError, StorageUnreachable, UploadCancelled, access_problems
from tests.common import run_cli

if TYPE_CHECKING:  # a runtime import would load the plugin before pytest can rewrite its asserts
    from tests.s3_fixtures import S3Bucket

pytest_plugins = ["tests.s3_fixtures"]

PREFIX = "greenrun"
RUN = "runs/2026-12-01_10-00-00"
MIB = 1024 * 1024
# The tiny model made wider: 26 MB of weights and 53 MB of AdamW state, so both go up as multipart uploads.
WIDE = ["model.n_embd=512", "model.n_head=2", "trainer.max_steps=100000", "preflight=false"]


# --- helpers --------------------------------------------------------------------------------------------


class ThrottledProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream`; what clients send goes at most `rate` bytes/s per
    connection (None = full speed; settable while connections are open). Closing either side closes both."""

    def __init__(self, upstream: str, rate: float | None = None) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.rate = (host, int(port)), rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="throttled-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # the server is gone (the module's moto stopped): refuse this one too
                client.close()
                continue
            for src, dst, slow in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, slow), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while True:
                rate = self.rate if slow else None
                data = src.recv(max(1024, int(rate / 20)) if rate else 65536)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def throttled(moto_server):
    proxies: list[ThrottledProxy] = []

    def make(rate: float | None = None) -> ThrottledProxy:
        proxies.append(ThrottledProxy(moto_server.endpoint_url, rate))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


class Train:
    """`python -m greenrun train ARGS` in the background, output to a file (a pipe could fill and block it)."""

    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
        with open(log, "w") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "greenrun", "train", *args], env=env, stdout=out, stderr=out
            )

    def text(self) -> str:
        return " ".join(self.log.read_text().split())

    def wait_until(self, condition, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.popen.poll() is not None:
                pytest.fail(
                    f"greenrun exited ({self.popen.returncode}) before {what}:\n{self.text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.popen.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.text()[-4000:]}")
            time.sleep(0.01)

    def exit_code(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"greenrun did not exit within {timeout} s:\n{self.text()[-4000:]}")


def max_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = []
    for line in lines:
        with contextlib.suppress(ValueError):  # the line being written
            steps.append(json.loads(line)["step"])
    return max(steps, default=-1)


def s3_args(bucket: str, endpoint: str, *extra: str) -> list[str]:
    return ["storage=s3", f"storage.bucket={bucket}", f"storage.endpoint_url={endpoint}", *extra]


def remote_of(s3: S3Bucket, run_id: str) -> Remote:
    cfg = StorageConfig(kind="s3", bucket=s3.name, prefix=PREFIX, endpoint_url=s3.endpoint_url)
    return Remote(S3Storage(cfg), run_id)


def stray_objects(s3: S3Bucket, run_id: str) -> list[str]:
    """Objects under the run's checkpoints/ that no committed manifest points at."""
    base = f"{PREFIX}/{run_id}/checkpoints/"
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.name, Prefix=base)
    keys = {item["Key"] for page in pages for item in page.get("Contents", [])}
    pointed = set()
    for key in [k for k in keys if k.endswith("/manifest.json")]:
        manifest = json.loads(s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read())
        pointed |= {key, *(f"{PREFIX}/{k}" for k in manifest["keys"].values())}
    return sorted(keys - pointed)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def snap(step: int, value: float = 1.0, big: int = 0) -> checkpoint.Snapshot:
    tensors = {"w": torch.full((64, 64), value)}
    if big:
        tensors["big"] = torch.randn(big // 4, generator=torch.Generator().manual_seed(step))
    return checkpoint.Snapshot(
        step=step,
        model=tensors,
        aliases={},
        optimizer={"state": {0: {"exp_avg": torch.ones(8) * value}}, "param_groups": []},
        trainer={"step": step},
        meta={"config_hash": "abc", "val_loss": None},
    )


# --- 1. every upload fails: exit 77, and summary.json and the console say so ----------------------------


def test_failed_uploads_exit_77_and_summary_json_says_so(tiny, s3_bucket, faulty_proxy, tmp_path):
    # Every request for a checkpoint key fails (503 SlowDown, one try); config.yaml and the tokens go up.
    proxy = faulty_proxy(fail_rate=1.0, faults=("slowdown",), match=lambda m, p: "/checkpoints/" in p)
    run_dir = tmp_path / "failing"
    args = s3_args(s3_bucket.name, proxy.url, "storage.max_attempts=1")
    r = run_cli("train", *tiny, *args, "trainer.max_steps=6", "checkpoint.interval=3", f"run.dir={run_dir}")
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 77, text[-4000:]
    assert "the newest checkpoint (step 6) is NOT in the bucket" in text
    assert "the newest checkpoint safe in the bucket: none" in text
    remote = summary(run_dir)["remote"]
    assert remote["committed"] == 0 and remote["failed"] >= 1
    assert remote["failed"] + remote["skipped"] == 2  # steps 3 and 6: each one is accounted for
    assert remote["newest_committed_step"] is None and remote["newest_local_step"] == 6
    assert remote["safe"] is False
    assert {c["step"] for c in remote["checkpoints"]} == {3, 6}
    assert checkpoint.verify(checkpoint.step_dir(run_dir / "checkpoints", 6)) is None  # safe on this disk


def test_uploads_that_commit_are_counted_and_exit_0(tiny, s3_bucket, tmp_path):
    run_dir = tmp_path / "fine"
    args = s3_args(s3_bucket.name, s3_bucket.endpoint_url)
    r = run_cli("train", *tiny, *args, "trainer.max_steps=6", "checkpoint.interval=3", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-4000:]
    remote = summary(run_dir)["remote"]
    assert remote["safe"] is True and remote["newest_committed_step"] == 6 and remote["failed"] == 0
    assert remote["committed"] + remote["skipped"] == 2
    assert "checkpoint uploads: " in r.stdout + r.stderr


# --- 2. SIGTERM and an upload that cannot fit: ends within the deadline, aborted, exit 77 ---------------


def test_sigterm_with_an_upload_that_cannot_fit_ends_in_time_aborted_and_local_only(
    tiny, s3_bucket, throttled, tmp_path
):
    proxy, run_dir, deadline_s = throttled(), tmp_path / "slow", 6.0
    args = s3_args(s3_bucket.name, proxy.url, "storage.part_size_mb=8", "storage.max_concurrency=2")
    proc = Train(
        *tiny,
        *WIDE,
        *args,
        "checkpoint.interval=5",
        f"spot.deadline_s={deadline_s}",
        f"run.dir={run_dir}",
        log=tmp_path / "slow.log",
    )
    remote = remote_of(s3_bucket, run_dir.name)
    proc.wait_until(lambda: remote.steps() != [], "a first checkpoint committed in the bucket")
    proxy.rate = 256_000  # bytes/s per connection: the next 80 MB checkpoint needs minutes
    at = max_step(run_dir)
    proc.wait_until(lambda: max_step(run_dir) >= at + 3, "three more steps")
    sent = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    code = proc.exit_code(60)
    took = time.monotonic() - sent
    text = proc.text()
    assert code == 77, text[-4000:]
    assert took < deadline_s, f"exit {took:.2f} s after SIGTERM"
    safe_step = remote.steps()[0]  # what committed before the link slowed down
    assert "committed locally only" in text and "and uploaded" not in text
    assert f"the newest checkpoint safe in the bucket: step {safe_step}" in text.lower()
    assert s3_bucket.open_uploads() == []  # every multipart upload was aborted
    assert stray_objects(s3_bucket, run_dir.name) == []  # and what the uploads sent was deleted
    result = summary(run_dir)
    assert result["step"] > safe_step
    assert result["emergency"] == "local" and result["remote"]["safe"] is False
    assert result["remote"]["newest_committed_step"] == safe_step
    (newest,) = checkpoint.committed(run_dir / "checkpoints")[:1]
    assert int(newest.name[5:]) == result["step"] and checkpoint.verify(newest) is None


# --- 3. exit 75 only when the emergency manifest is committed in the bucket ------------------------------


def _sigterm_at_step_3(tiny: list[str], run_dir: Path, storage: list[str]) -> Train:
    """A long run mirrored to a bucket, sent SIGTERM once it has trained three steps."""
    proc = Train(
        *tiny,
        "trainer.max_steps=100000",
        "preflight=false",
        *storage,
        "checkpoint.interval=0",
        f"run.dir={run_dir}",
        log=run_dir.parent / f"{run_dir.name}.log",
    )
    proc.wait_until(lambda: max_step(run_dir) >= 3, "step 3")
    proc.popen.send_signal(signal.SIGTERM)
    return proc


def test_sigterm_exits_75_only_with_the_manifest_in_the_bucket(tiny, s3_bucket, faulty_proxy, tmp_path):
    run_dir = tmp_path / "ok"
    proc = _sigterm_at_step_3(tiny, run_dir, s3_args(s3_bucket.name, s3_bucket.endpoint_url))
    assert proc.exit_code(60) == 75, proc.text()[-4000:]
    step = summary(run_dir)["step"]
    assert remote_of(s3_bucket, run_dir.name).steps() == [step]
    assert summary(run_dir)["emergency"] == "bucket" and "and uploaded" in proc.text()

    # The same with every checkpoint request failing: committed locally, not 75.
    proxy = faulty_proxy(fail_rate=1.0, faults=("slowdown",), match=lambda m, p: "/checkpoints/" in p)
    run_dir = tmp_path / "failing"
    proc = _sigterm_at_step_3(tiny, run_dir, s3_args(s3_bucket.name, proxy.url, "storage.max_attempts=1"))
    code, text = proc.exit_code(60), proc.text()
    assert code == 77, text[-4000:]
    assert "committed locally only" in text and "and uploaded" not in text
    assert remote_of(s3_bucket, run_dir.name).steps() == []
    assert summary(run_dir)["emergency"] == "local"


# --- 4. a second signal during the emergency save: exit 76, nothing left open ----------------------------


def test_second_signal_during_the_emergency_upload_exits_76(tiny, s3_bucket, throttled, tmp_path):
    proxy, run_dir = throttled(rate=256_000), tmp_path / "impatient"
    args = s3_args(s3_bucket.name, proxy.url, "storage.part_size_mb=8", "storage.max_concurrency=2")
    proc = Train(
        *tiny,
        *WIDE,
        *args,
        "checkpoint.interval=0",
        "spot.deadline_s=60",
        f"run.dir={run_dir}",
        log=tmp_path / "impatient.log",
    )
    proc.wait_until(lambda: max_step(run_dir) >= 3, "step 3")
    proc.popen.send_signal(signal.SIGTERM)
    proc.wait_until(lambda: "writing an emergency checkpoint" in proc.text(), "the emergency save")
    time.sleep(1.5)  # past the window in which a second delivery counts as the same signal
    sent = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    code = proc.exit_code(30)
    assert code == 76, proc.text()[-4000:]
    assert time.monotonic() - sent < 5.0
    assert "second signal SIGTERM" in proc.text()
    assert s3_bucket.open_uploads() == []
    assert remote_of(s3_bucket, run_dir.name).steps() == []


# --- 5. remote tidiness: prune and LATEST -----------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "bucket")
    s3 = request.getfixturevalue("s3_bucket")
    cfg = StorageConfig(
        kind="s3", bucket=s3.name, prefix=PREFIX, part_size_mb=8, endpoint_url=s3.endpoint_url
    )
    return S3Storage(cfg)


def written(root: Path, step: int) -> Path:
    return checkpoint.write(snap(step), root)


def test_prune_removes_a_killed_attempts_files_at_the_newest_commit(storage: Storage, tmp_path: Path) -> None:
    """A process killed between its files and its manifest of the final step; the resumed one commits it."""
    killed = Remote(storage, RUN, attempt="a-20261201T100000Z-dead")
    resumed = Remote(storage, RUN, attempt="a-20261201T110000Z-live")
    later = "a-20261201T120000Z-next"  # started after this process: may still be racing, left alone
    final = written(tmp_path / "local", 40)
    base = f"{RUN}/checkpoints/step-00000040"
    for name in checkpoint.FILES:
        storage.put(f"{base}/{killed.attempt}/{name}", final / name)
    storage.put_bytes(f"{base}/{later}/model.safetensors", b"x")
    storage.put_bytes(f"{RUN}/checkpoints/step-00000041/{resumed.attempt}/model.safetensors", b"x")  # ours
    storage.put_bytes(f"{RUN}/checkpoints/step-00000042/{later}/model.safetensors", b"x")  # someone's
    assert resumed.upload_checkpoint(final).committed
    resumed.prune(keep_last=2)
    left = storage.list(f"{RUN}/checkpoints/")
    assert not any(killed.attempt in key for key in left), left
    assert f"{base}/{later}/model.safetensors" in left
    assert f"{RUN}/checkpoints/step-00000041/{resumed.attempt}/model.safetensors" not in left
    assert f"{RUN}/checkpoints/step-00000042/{later}/model.safetensors" in left
    assert checkpoint.verify(resumed.fetch(40, tmp_path / "fetched")) is None


def test_a_resumed_process_that_finds_its_step_committed_points_latest_at_it(
    storage: Storage, tmp_path: Path
) -> None:
    first = Remote(storage, RUN, attempt="a-20261201T100000Z-first")
    assert first.upload_checkpoint(written(tmp_path / "local", 10)).committed
    step20 = written(tmp_path / "local", 20)
    # Killed between the manifest of step 20 and LATEST: the hint still says 10.
    first._point_latest = lambda step, attempt: None  # type: ignore[method-assign]
    assert first.upload_checkpoint(step20).committed
    assert json.loads(storage.get_bytes(f"{RUN}/LATEST"))["step"] == 10
    resumed = Remote(storage, RUN, attempt="a-20261201T110000Z-second")
    result = resumed.upload_checkpoint(step20)  # the same files: identical, nothing sent
    assert result.committed and result.bytes == 0
    assert json.loads(storage.get_bytes(f"{RUN}/LATEST")) == {"step": 20, "attempt": first.attempt}


# --- 6. the emergency save's parts ----------------------------------------------------------------------


def test_staged_checkpoint_has_the_bytes_and_manifest_of_checkpoint_write(tmp_path: Path) -> None:
    s = snap(5, value=2.0, big=MIB)
    reference = checkpoint.write(s, tmp_path / "written")
    staged = Staged(s, tmp_path / "staged")
    staged.render()
    views = {name: bytes(staged.data(name)) for name in checkpoint.FILES}
    path = staged.seal()
    staged.close()
    assert checkpoint.verify(path) is None
    for name in checkpoint.FILES:
        assert (path / name).read_bytes() == (reference / name).read_bytes() == views[name], name
    mine, theirs = checkpoint.read_manifest(path), checkpoint.read_manifest(reference)
    assert list(mine) == list(theirs)  # the same fields in the same order
    assert {k: v for k, v in mine.items() if k != "created"} == {
        k: v for k, v in theirs.items() if k != "created"
    }
    assert [p.name for p in (tmp_path / "staged").iterdir()] == ["step-00000005"]  # no temp dir left


def test_cancelled_multipart_put_aborts_at_once_on_daemon_threads(s3_bucket: S3Bucket, throttled) -> None:
    proxy = throttled(rate=200_000)
    cfg = StorageConfig(kind="s3", bucket=s3_bucket.name, prefix=PREFIX, part_size_mb=8, max_concurrency=2)
    st = S3Storage(StorageConfig(**{**cfg.__dict__, "endpoint_url": proxy.url}))
    cancel, errors = threading.Event(), []

    def put() -> None:
        try:
            st.put_bytes("big/object", os.urandom(24 * MIB), cancel=cancel)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=put, daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while not s3_bucket.open_uploads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s3_bucket.open_uploads() == [f"{PREFIX}/big/object"]
    senders = [t for t in threading.enumerate() if t.name == "greenrun-upload"]
    assert senders and all(t.daemon for t in senders)  # an exiting interpreter does not wait for them
    cancel.set()
    t0 = time.monotonic()
    worker.join(10)
    assert time.monotonic() - t0 < 3.0
    assert len(errors) == 1 and isinstance(errors[0], UploadCancelled)
    assert s3_bucket.open_uploads() == []


def test_uploader_report_counts_every_outcome(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "bucket")
    up = Uploader(Remote(store, RUN))
    up.submit(written(tmp_path / "local", 1))
    assert up.wait(10)
    up.record(UploadResult(2, 0, 1.0, False, "abandoned at the deadline"))
    up.abandon("closing")
    up.submit(written(tmp_path / "local", 3))  # refused after abandon: skipped, still accounted for
    report = up.report(newest_step=3)
    assert (report["committed"], report["failed"], report["skipped"]) == (1, 1, 1)
    assert report["newest_committed_step"] == 1 and report["safe"] is False
    safe, line = describe(report)
    assert not safe and "step 3" in line and "step 1" in line
    assert describe(None) == (True, "")
    assert up.report(newest_step=1)["safe"] is True


# --- 7. storage problems are found before the preflight -----------------------------------------------


def test_check_access_local(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "not" / "yet" / "there").check_access()  # creatable: fine, nothing created
    assert not (tmp_path / "not").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageAccessError, match="not a directory"):
        LocalStorage(tmp_path / "file" / "run").check_access()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere
        with pytest.raises(StorageAccessError, match="not writable"):
            LocalStorage(locked / "run").check_access()


def test_check_access_s3_tells_configuration_from_network(s3_bucket: S3Bucket, monkeypatch, tmp_path) -> None:
    def cfg(**kw: object) -> StorageConfig:
        return StorageConfig(
            **{
                "kind": "s3",
                "bucket": s3_bucket.name,
                "prefix": PREFIX,
                "endpoint_url": s3_bucket.endpoint_url,
                **kw,
            }
        )

    assert access_problems(cfg(), tmp_path) == []
    (problem,) = access_problems(cfg(bucket="no-such-bucket"), tmp_path)
    assert "no-such-bucket" in problem and "storage.bucket" in problem
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(StorageUnreachable, match=f"could not connect to http://127.0.0.1:{port}"):
        access_problems(cfg(endpoint_url=f"http://127.0.0.1:{port}"), tmp_path)
    assert time.monotonic() - t0 < 10
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (problem,) = access_problems(cfg(), tmp_path)
    assert "default chain" in problem and "storage.bucket" in problem


def test_smoke_says_whether_an_emergency_checkpoint_fits(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    cfg = StorageConfig(kind="s3", bucket=s3_bucket.name, prefix=PREFIX, endpoint_url=s3_bucket.endpoint_url)
    line = emergency.estimate_line(cfg, SpotConfig(), 1_000_000, tmp_path)
    assert "~0.01 GB" in line and "upload measured at" in line
    assert "fits the 25 s SIGTERM deadline" in line
    tight = emergency.estimate_line(cfg, SpotConfig(deadline_s=0.5), 1_000_000, tmp_path)
    assert "does NOT fit the 0.5 s SIGTERM deadline" in tight and "exit 77" in tight
    aws = emergency.estimate_line(cfg, SpotConfig(provider="aws", deadline_s=0.5), 1_000_000, tmp_path)
    assert "fits the 120 s aws notice window" in aws
    assert s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount") == 0  # the probe is gone
    local = emergency.estimate_line(StorageConfig(), SpotConfig(), 124_000_000, tmp_path)
    assert "~1.49 GB" in local and "nothing to upload" in local
