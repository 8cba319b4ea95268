"""Issue 3's promises end to end, on the CPU: the real CLI in subprocesses, S3 played by moto.

Every run trains the TINY model for MAX_STEPS steps with the same training math as one straight, uninterrupted
run (`straight`), so "exact" means: the losses logged after the resume point and the final weights equal it.
The subprocesses get fake AWS credentials whose secret is SECRET, and never the developer's own AWS setup.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load_file

from greenrun.ckpt import checkpoint
from greenrun.ckpt.remote import Remote
from greenrun.storage import S3Storage, StorageConfig
from tests.common import TINY
from tests.fake_metadata import FakeMetadata

pytest_plugins = ["tests.s3_fixtures"]

MAX_STEPS = 40
# The training math every run here shares with `straight`; checkpoint.* and storage.* are not math.
BASE = [
    *TINY,
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.log_interval=1",
    "trainer.eval_interval=10",
    "preflight=false",
]
PREFIX = "greenrun"  # storage.prefix of conf/storage/s3.yaml
SECRET = "SUPERSECRET123"
ACCESS_KEY = "AKIAGREENRUNE2ETEST"
EXIT_PREEMPTED = 75
_buckets = itertools.count()
_procs = itertools.count()


# --- the CLI in a subprocess -------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """This environment minus any AWS setup, plus fake credentials; wide lines so rich never wraps a message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PYTHONUNBUFFERED="1",
        COLUMNS="400",
        # One thread per run: the tiny model gains nothing from two, and on 2 cores shared with moto and
        # the test process, spinning OpenMP threads doubled the CPU time. Same for every run, so exactness holds.
        OMP_NUM_THREADS="1",
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        """stdout and stderr with whitespace collapsed, for substring checks."""
        return " ".join(f"{self.stdout}\n{self.stderr}".split())

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"


class Proc:
    """`python -m greenrun ARGS` in the background; output goes to files (a pipe would fill and block it)."""

    def __init__(self, *args: str, logs: Path, cwd: Path | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        stem = logs / f"{next(_procs):03d}-{args[0]}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "greenrun", *args], cwd=cwd, env=cli_env(), stdout=out, stderr=err
            )
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill9(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=30)

    def result(self, timeout: float = 240) -> Result:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            pytest.fail(f"greenrun did not exit within {timeout} s:\n{self.peek()}")
        return self.peek()

    def peek(self) -> Result:
        rc = self.popen.returncode if self.popen.returncode is not None else -999
        return Result(rc, self.out_path.read_text(), self.err_path.read_text())

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.alive():
                pytest.fail(f"greenrun exited before {what}:\n{self.peek()}")
            if time.monotonic() > deadline:
                self.kill9()
                pytest.fail(f"timed out waiting for {what}:\n{self.peek()}")
            time.sleep(0.002)


def run(*args: str, logs: Path, cwd: Path | None = None, timeout: float = 240) -> Result:
    return Proc(*args, logs=logs, cwd=cwd).result(timeout)


# --- reading a run directory ----------------------------------------------------------------------------


def metrics(run_dir: Path) -> list[dict]:
    """The logged steps (resume and preempt event lines, which name a step too, left out)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):  # the line being written right now
            rows.append(json.loads(line))
    return [row for row in rows if "event" not in row]


def max_step(run_dir: Path) -> int:
    return max((row["step"] for row in metrics(run_dir)), default=-1)


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir) if "loss" in row}


def committed_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint.committed(run_dir / "checkpoints")]


def assert_matches_straight(run_dir: Path, straight: Path, after: int) -> None:
    """Losses of the steps after `after` and the final weights equal the uninterrupted run, bit for bit."""
    mine, ref = losses(run_dir), losses(straight)
    later = range(after + 1, MAX_STEPS + 1)
    assert [mine.get(s) for s in later] == [ref[s] for s in later]
    final = checkpoint.step_dir(run_dir / "checkpoints", MAX_STEPS)
    assert checkpoint.verify(final) is None
    got = load_file(str(final / "model.safetensors"))
    want = load_file(str(checkpoint.step_dir(straight / "checkpoints", MAX_STEPS) / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def files_under(root: Path) -> list[Path]:
    return [Path(d, n) for d, _, names in os.walk(root) for n in names]


# --- S3 on moto -----------------------------------------------------------------------------------------


class S3:
    """Buckets on the module's moto server, a direct client for assertions and Remote views of runs."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET, region_name="us-east-1"
        )
        self.client = session.client("s3", endpoint_url=endpoint_url)

    def new_bucket(self) -> str:
        name = f"greenrun-e2e-{next(_buckets)}"
        self.client.create_bucket(Bucket=name)
        return name

    def args(self, bucket: str, endpoint_url: str | None = None) -> list[str]:
        return [
            "storage=s3",
            f"storage.bucket={bucket}",
            f"storage.endpoint_url={endpoint_url or self.endpoint_url}",
        ]

    def url(self, bucket: str, run_id: str) -> str:
        return f"s3://{bucket}/{PREFIX}/{run_id}"

    def remote(self, bucket: str, run_id: str) -> Remote:
        cfg = StorageConfig(kind="s3", bucket=bucket, prefix=PREFIX, endpoint_url=self.endpoint_url)
        return Remote(S3Storage(cfg), run_id)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body)

    def manifest(self, bucket: str, run_id: str, step: int) -> dict:
        return json.loads(self.get(bucket, f"{PREFIX}/{run_id}/checkpoints/step-{step:08d}/manifest.json"))

    def open_uploads(self, bucket: str) -> list[str]:
        return [u["Key"] for u in self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def copy_bucket(self, src: str) -> str:
        dst = self.new_bucket()
        for key in self.keys(src):
            self.client.copy_object(Bucket=dst, Key=key, CopySource={"Bucket": src, "Key": key})
        return dst

    def assert_tidy(self, bucket: str, run_id: str) -> list[int]:
        """Every committed step verifies, no file lies outside a committed attempt, no upload is open.

        Returns the committed steps, newest first.
        """
        remote = self.remote(bucket, run_id)
        steps = remote.steps()
        pointed = set()
        for step in steps:
            manifest = self.manifest(bucket, run_id, step)
            pointed |= {f"{PREFIX}/{key}" for key in manifest["keys"].values()}
            pointed.add(f"{PREFIX}/{remote.manifest_key(step)}")
        stray = set(self.keys(bucket, f"{PREFIX}/{run_id}/checkpoints/")) - pointed
        assert not stray, f"uncommitted objects left in the bucket: {sorted(stray)}"
        assert self.open_uploads(bucket) == []
        return steps

    def assert_verifies(self, bucket: str, run_id: str, steps: list[int], scratch: Path) -> None:
        remote = self.remote(bucket, run_id)
        for step in steps:
            path = remote.fetch(step, scratch)  # raises CheckpointError unless every sha256 matches
            assert checkpoint.verify(path) is None


@pytest.fixture(scope="module")
def s3(moto_server) -> S3:
    with pytest.MonkeyPatch.context() as mp:  # Remote/S3Storage in this process use boto3's default chain
        for name, value in cli_env().items():
            if name.startswith("AWS_"):
                mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        yield S3(moto_server.endpoint_url)


@pytest.fixture(scope="module")
def e2e_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spot-e2e")


@pytest.fixture(scope="module")
def straight(e2e_tmp: Path, cache_dir: Path) -> Path:
    """The reference: the same math, no interruption, no S3."""
    run_dir = e2e_tmp / "straight"
    r = run(
        "train",
        *BASE,
        f"data.cache_dir={cache_dir}",
        "checkpoint.interval=0",
        f"run.dir={run_dir}",
        logs=e2e_tmp / "logs",
    )
    assert r.returncode == 0, r
    return run_dir


@pytest.fixture(scope="module")
def sliced(e2e_tmp: Path, cache_dir: Path, s3: S3) -> tuple[str, Path, Result]:
    """A run mirrored to S3 that stopped at step 20 with checkpoints every 5 steps and keep_last=2."""
    bucket, run_dir = s3.new_bucket(), e2e_tmp / "sliced-run"
    r = run(
        "train",
        *BASE,
        f"data.cache_dir={cache_dir}",
        *s3.args(bucket),
        "checkpoint.interval=5",
        "checkpoint.keep_last=2",
        "trainer.stop_at_step=20",
        f"run.dir={run_dir}",
        logs=e2e_tmp / "logs",
    )
    assert r.returncode == 0, r
    return bucket, run_dir, r


# --- 1. SIGTERM: emergency checkpoint, exit 75, exact resume from S3 on an empty machine ----------------


def test_sigterm_exit_75_then_resume_from_s3_in_an_empty_dir_is_exact(straight, tiny, s3, tmp_path):
    bucket, run_dir, logs = s3.new_bucket(), tmp_path / "spot-run", tmp_path / "logs"
    proc = Proc(
        "train", *tiny, *BASE, *s3.args(bucket), "checkpoint.interval=0", f"run.dir={run_dir}", logs=logs
    )
    proc.wait_until(lambda: max_step(run_dir) >= 5, "step 5 in metrics.jsonl")
    proc.signal(signal.SIGTERM)
    r = proc.result(60)
    assert r.returncode == EXIT_PREEMPTED, r
    assert "SIGTERM: writing an emergency checkpoint at step" in r.text
    (step,) = committed_steps(run_dir)  # checkpoint.interval=0: the emergency checkpoint is the only one
    assert 5 <= step < MAX_STEPS, "the signal must land mid-training"
    assert s3.remote(bucket, run_dir.name).steps() == [step]

    # A fresh machine: empty working directory, its own token cache path, only the bucket to go on.
    elsewhere, new_cache = tmp_path / "elsewhere", tmp_path / "fresh-cache"
    elsewhere.mkdir()
    r = run(
        "resume",
        s3.url(bucket, run_dir.name),
        f"storage.endpoint_url={s3.endpoint_url}",
        f"data.cache_dir={new_cache}",
        cwd=elsewhere,
        logs=logs,
    )
    assert r.returncode == 0, r
    restored = elsewhere / "runs" / run_dir.name
    assert f"at step {step}" in r.text
    assert min(losses(restored)) == step + 1  # nothing came over but the checkpoint
    assert_matches_straight(restored, straight, after=step)
    # The token cache came from the bucket: data.build would have left its lock file next to it.
    key16 = checkpoint.read_manifest(checkpoint.step_dir(restored / "checkpoints", step))["data_cache_key"][
        :16
    ]
    assert (new_cache / key16 / "meta.json").is_file()
    assert not (new_cache / f".{key16}.lock").exists(), "the tokens were rebuilt here, not downloaded"


# --- 2. kill -9 anywhere: a valid checkpoint always remains, locally and in S3 ---------------------------


def test_kill9_at_random_points_always_leaves_a_resumable_checkpoint(straight, tiny, s3, tmp_path):
    rng = random.Random(20261122)
    bucket, run_dir, logs = s3.new_bucket(), tmp_path / "killed", tmp_path / "logs"
    ckpts, remote = run_dir / "checkpoints", s3.remote(bucket, run_dir.name)

    def temp_dirs() -> set[str]:
        return {p.name for p in ckpts.glob(f"{checkpoint.TMP_PREFIX}*")} if ckpts.is_dir() else set()

    # Kill 1: a few steps into a fresh run (checkpoint.interval=1: a write is nearly always under way).
    proc = Proc(
        "train", *tiny, *BASE, *s3.args(bucket), "checkpoint.interval=1", f"run.dir={run_dir}", logs=logs
    )
    proc.wait_until(lambda: max_step(run_dir) >= 3, "step 3")  # step 2's save joined step 1's commit
    time.sleep(rng.uniform(0, 0.05))
    proc.kill9()
    where = ["a few steps in"]
    cut_writes = len(temp_dirs())  # a temp dir left behind = a checkpoint write the kill cut short

    # Then resumes, each killed at another kind of moment.
    for plan in (
        "during a checkpoint write",
        "at a random moment",
        "after a new commit in S3",
        "during a checkpoint write",
    ):
        valid = checkpoint.latest_valid(ckpts, warn=lambda m: None)
        assert valid is not None, f"no valid local checkpoint after kill -9 {where[-1]}"
        start = int(valid.name.split("-")[1])
        if start >= MAX_STEPS - 3:
            break  # too close to the end for another kill to land mid-run
        before = temp_dirs()
        proc = Proc("resume", str(run_dir), logs=logs)
        if plan == "during a checkpoint write":
            proc.wait_until(lambda b=before: bool(temp_dirs() - b), "a checkpoint temp directory")
        elif plan == "at a random moment":
            at = proc.started + rng.uniform(0.5, 4.5)  # often still starting up, sometimes training
            proc.wait_until(lambda at=at: time.monotonic() > at, "the random moment")
        else:  # this also makes sure the bucket holds a checkpoint for the resume from S3 below
            seen = max(remote.steps(), default=0)
            proc.wait_until(lambda seen=seen: max(remote.steps(), default=0) > seen, "a new commit in S3")
            time.sleep(rng.uniform(0, 0.1))
        proc.kill9()
        where.append(f"{plan} (resumed from step {start})")
        cut_writes += len(temp_dirs() - before)
        assert proc.peek().returncode == -signal.SIGKILL, f"the kill came too late:\n{proc.peek()}"

    assert cut_writes >= 1, f"no kill landed during a checkpoint write: {where}"
    assert checkpoint.latest_valid(ckpts, warn=lambda m: None) is not None
    assert remote.steps(), "nothing committed in S3"
    # Finish from the bucket on an empty machine: the newest remote checkpoint that verifies is used.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run(
        "resume",
        s3.url(bucket, run_dir.name),
        f"storage.endpoint_url={s3.endpoint_url}",
        cwd=elsewhere,
        logs=logs,
    )
    assert r.returncode == 0, f"killed: {where}\n{r}"
    restored = elsewhere / "runs" / run_dir.name
    assert_matches_straight(restored, straight, after=min(losses(restored)) - 1)
    # And the local run directory, after all those kills, still finishes exactly too.
    r = run("resume", str(run_dir), logs=logs)
    assert r.returncode == 0, f"killed: {where}\n{r}"
    assert_matches_straight(run_dir, straight, after=0)


# --- 3. a flipped byte in S3: resume warns and takes the previous checkpoint ----------------------------


def test_flipped_byte_in_s3_falls_back_to_the_previous_checkpoint(straight, sliced, s3, tmp_path):
    src, sliced_dir, _ = sliced
    bucket, run_id = s3.copy_bucket(src), sliced_dir.name
    newest, previous = s3.remote(bucket, run_id).steps()[:2]
    key = f"{PREFIX}/{s3.manifest(bucket, run_id, newest)['keys']['model.safetensors']}"
    blob = bytearray(s3.get(bucket, key))
    blob[len(blob) // 2] ^= 0x01
    s3.put(bucket, key, bytes(blob))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run(
        "resume",
        s3.url(bucket, run_id),
        f"storage.endpoint_url={s3.endpoint_url}",
        cwd=elsewhere,
        logs=tmp_path / "logs",
    )
    assert r.returncode == 0, r
    assert (
        f"skipping remote checkpoint: remote step-{newest:08d}/model.safetensors: sha256 does not match"
        in r.text
    )
    assert f"at step {previous}" in r.text
    restored = elsewhere / "runs" / run_id
    assert_matches_straight(restored, straight, after=previous)
    # The resumed run's own uploads replaced the broken one; retention applied to the bucket again.
    steps = s3.assert_tidy(bucket, run_id)
    assert steps[0] == MAX_STEPS and len(steps) == 2, steps


# --- 4. a flaky network: uploads still commit, nothing half-done stays behind ---------------------------


def test_uploads_through_a_flaky_network_commit_and_leave_no_open_uploads(tiny, s3, faulty_proxy, tmp_path):
    proxy = faulty_proxy(fail_rate=0.15, faults=("slowdown", "reset"), seed=3)
    bucket, run_dir = s3.new_bucket(), tmp_path / "flaky"
    # 256 wide: optimizer.pt is ~14 MB, so it goes up as a multipart upload in 8 MiB parts.
    r = run(
        "train",
        *tiny,
        *BASE,
        "model.n_embd=256",
        "trainer.max_steps=12",
        *s3.args(bucket, endpoint_url=proxy.url),
        "storage.part_size_mb=8",
        "checkpoint.interval=3",
        "checkpoint.keep_last=3",
        f"run.dir={run_dir}",
        logs=tmp_path / "logs",
    )
    assert r.returncode == 0, r
    assert sum(proxy.faults.values()) >= 3, f"too few faults injected to mean anything: {proxy.faults}"
    assert "upload of step" not in r.text, r  # the uploader's warning for a failed upload
    assert (run_dir / "checkpoints" / "step-00000012" / "optimizer.pt").stat().st_size > 8 * 1024 * 1024
    steps = s3.assert_tidy(bucket, run_dir.name)
    assert steps[0] == 12 and len(steps) <= 3, steps
    s3.assert_verifies(bucket, run_dir.name, steps, tmp_path / "fetched")


# --- 5. an AWS spot notice: emergency checkpoint within the deadline, in S3 too -------------------------


def test_aws_spot_notice_commits_an_emergency_checkpoint_within_the_deadline(tiny, s3, tmp_path):
    bucket, run_dir, deadline_s = s3.new_bucket(), tmp_path / "noticed", 15.0
    with FakeMetadata() as md:
        proc = Proc(
            "train",
            *tiny,
            *BASE,
            "trainer.max_steps=3000",  # far more than the test lets it run
            *s3.args(bucket),
            "checkpoint.interval=0",
            "spot=aws",
            f"spot.metadata_url={md.url}",
            "spot.poll_interval_s=0.2",
            f"spot.deadline_s={deadline_s}",
            f"run.dir={run_dir}",
            logs=tmp_path / "logs",
        )
        proc.wait_until(lambda: md.count("aws_spot") >= 1 and max_step(run_dir) >= 3, "the poller and step 3")
        md.issue_notice()
        noticed = time.monotonic()
        r = proc.result(60)
        took = time.monotonic() - noticed
    assert r.returncode == EXIT_PREEMPTED, r
    assert took < deadline_s, f"exit {took:.1f} s after the notice"
    assert "aws spot notice: terminate" in r.text and "and uploaded" in r.text
    (step,) = committed_steps(run_dir)
    assert 3 <= step < 3000
    assert checkpoint.verify(checkpoint.step_dir(run_dir / "checkpoints", step)) is None
    assert s3.assert_tidy(bucket, run_dir.name) == [step]
    s3.assert_verifies(bucket, run_dir.name, [step], tmp_path / "fetched")


# --- 6. the AWS secret never reaches output, the run directory or the bucket ----------------------------


def test_aws_secret_appears_in_no_output_and_no_file(tiny, s3, tmp_path):
    bucket, run_dir, logs = s3.new_bucket(), tmp_path / "secretive", tmp_path / "logs"
    results = [
        run(
            "train",
            *tiny,
            *BASE,
            "trainer.stop_at_step=6",
            "checkpoint.interval=3",
            *s3.args(bucket),
            f"run.dir={run_dir}",
            logs=logs,
        ),
        run("resume", str(run_dir), "trainer.stop_at_step=8", logs=logs),
        # An S3 failure: the error message is where credentials would leak.
        run(
            "resume",
            s3.url("greenrun-e2e-no-such-bucket", run_dir.name),
            f"storage.endpoint_url={s3.endpoint_url}",
            cwd=tmp_path,
            logs=logs,
        ),
    ]
    assert [r.returncode for r in results[:2]] == [0, 0], results
    assert results[2].returncode in (1, 2) and "no-such-bucket" in results[2].text, results[2]
    for r in results:
        assert SECRET not in r.stdout + r.stderr
    files = files_under(run_dir)
    assert {"config.yaml", "metrics.jsonl", "manifest.json", "summary.json"} <= {p.name for p in files}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    keys = s3.keys(bucket)
    assert any(k.endswith("/config.yaml") for k in keys)
    for key in keys:
        assert SECRET.encode() not in s3.get(bucket, key), key


# --- 7. names from the bucket cannot reach outside the run directory ------------------------------------


def test_path_traversal_names_in_the_bucket_are_refused(straight, sliced, s3, tmp_path):
    src, sliced_dir, _ = sliced
    bucket, run_id = s3.copy_bucket(src), sliced_dir.name
    base = f"{PREFIX}/{run_id}"
    good = s3.remote(bucket, run_id).steps()[0]
    manifest = s3.manifest(bucket, run_id, good)
    up = "../" * 6  # from cwd/runs/<id>/checkpoints/.tmp-*/ to tmp_path/w/x: outside the run, inside tmp_path

    def plant(step: int, rename: dict[str, str], key_of: dict[str, str]) -> None:
        """A committed-looking step: copies of the good shards, its manifest with names/keys rewritten."""
        crafted = json.loads(json.dumps(manifest))
        crafted["step"], crafted["files"], crafted["keys"] = step, {}, {}
        for name, entry in manifest["files"].items():
            key = f"{run_id}/checkpoints/step-{step:08d}/a-planted/{name}"
            s3.client.copy_object(
                Bucket=bucket,
                Key=f"{PREFIX}/{key}",
                CopySource={"Bucket": bucket, "Key": f"{PREFIX}/{manifest['keys'][name]}"},
            )
            crafted["files"][rename.get(name, name)] = entry
            crafted["keys"][rename.get(name, name)] = key_of.get(name, key)
        s3.put(bucket, f"{base}/checkpoints/step-{step:08d}/manifest.json", json.dumps(crafted).encode())

    s3.put(
        bucket,
        f"{base}/LATEST",
        json.dumps({"step": f"{up}escape-latest", "attempt": f"{up}escape"}).encode(),
    )
    plant(99, {"trainer.pt": f"{up}escape-name"}, {})  # a file name that climbs out of the temp dir
    climbing_key = f"{run_id}/checkpoints/step-00000098/{up}escape-key"
    plant(98, {}, {"trainer.pt": climbing_key})  # a key that climbs
    s3.put(bucket, f"{PREFIX}/{climbing_key}", b"x")
    s3.put(bucket, f"{base}/checkpoints/step-00000001/../escape-stray", b"x")  # an odd key prune would see
    key16 = manifest["data_cache_key"][:16]
    s3.put(bucket, f"{base}/data/{key16}/..", b"x")  # an odd name in the token cache listing

    cwd = tmp_path / "w" / "x" / "y" / "z"
    cwd.mkdir(parents=True)
    logs = tmp_path / "logs"
    r = run(
        "resume",
        s3.url(bucket, run_id),
        f"storage.endpoint_url={s3.endpoint_url}",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=cwd,
        logs=logs,
    )
    assert r.returncode == 0, r
    assert "skipping remote checkpoint: remote step-00000099" in r.text
    assert "skipping remote checkpoint: remote step-00000098" in r.text
    assert f"at step {good}" in r.text
    assert "upload of step" not in r.text, "an upload was reported as failed"
    escaped = [p for p in files_under(tmp_path) if "escape" in p.name]
    assert escaped == [], f"written outside the run directory: {escaped}"
    restored = cwd / "runs" / run_id
    assert_matches_straight(restored, straight, after=good)
    assert json.loads(s3.get(bucket, f"{base}/LATEST"))["step"] == MAX_STEPS
    # The run's own newest checkpoint survives retention although the planted ones look newer.
    assert MAX_STEPS in s3.remote(bucket, run_id).steps()
    s3.assert_verifies(bucket, run_id, [MAX_STEPS], tmp_path / "fetched")

    # A run URL that climbs is a usage error, and nothing is created for it.
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(
        "resume",
        f"s3://{bucket}/{PREFIX}/..",
        f"storage.endpoint_url={s3.endpoint_url}",
        cwd=empty,
        logs=logs,
    )
    assert r.returncode == 2, r
    assert "invalid storage key" in r.text
    assert list(empty.iterdir()) == []


# --- 8. resume=auto: the same command twice continues; on an empty run.dir it starts fresh -------------


def test_resume_auto_continues_a_stopped_run_and_starts_an_empty_one_fresh(straight, tiny, tmp_path):
    run_dir, logs = tmp_path / "auto", tmp_path / "logs"
    run_dir.mkdir()  # empty: resume=auto has nothing to continue
    r = run("train", *tiny, *BASE, "resume=auto", "trainer.stop_at_step=10", f"run.dir={run_dir}", logs=logs)
    assert r.returncode == 0, r
    assert "resumed" not in r.text
    assert min(losses(run_dir)) == 1 and committed_steps(run_dir) == [10]
    r = run("train", *tiny, *BASE, "resume=auto", f"run.dir={run_dir}", logs=logs)
    assert r.returncode == 0, r
    assert "at step 10" in r.text
    assert [row["step"] for row in metrics(run_dir)] == list(range(MAX_STEPS + 1))  # no step twice
    assert_matches_straight(run_dir, straight, after=0)


def test_resume_auto_after_a_crash_before_any_checkpoint_starts_clean(tiny, tmp_path):
    run_dir, logs = tmp_path / "crashed-early", tmp_path / "logs"
    proc = Proc(
        "train", *tiny, *BASE, "resume=auto", "checkpoint.interval=0", f"run.dir={run_dir}", logs=logs
    )
    proc.wait_until(lambda: max_step(run_dir) >= 3, "step 3")
    proc.kill9()
    assert committed_steps(run_dir) == []
    r = run("train", *tiny, *BASE, "resume=auto", "trainer.stop_at_step=5", f"run.dir={run_dir}", logs=logs)
    assert r.returncode == 0, r
    assert [row["step"] for row in metrics(run_dir)] == list(range(6))


# --- 9. retention in S3 ---------------------------------------------------------------------------------


def test_keep_last_applies_to_the_bucket(sliced, s3):
    bucket, run_dir, r = sliced
    assert committed_steps(run_dir) == [20, 15]
    steps = s3.assert_tidy(bucket, run_dir.name)  # nothing uncommitted, no open upload
    assert len(steps) == 2 and steps[0] == 20, steps
    assert json.loads(s3.get(bucket, f"{PREFIX}/{run_dir.name}/LATEST"))["step"] == 20
