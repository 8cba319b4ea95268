"""Bucket, credential, endpoint and run-directory problems are found before the preflight spends its time,
each with one message and the right exit code."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tests.common import run_cli

if TYPE_CHECKING:
    from tests.s3_fixtures import S3Bucket

pytest_plugins = ["tests.s3_fixtures"]


def _s3(bucket: S3Bucket, name: str) -> list[str]:
    return ["storage=s3", f"storage.bucket={name}", f"storage.endpoint_url={bucket.endpoint_url}"]


def _env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


def test_a_missing_bucket_is_a_config_error_before_the_preflight(s3_bucket: S3Bucket, tiny, tmp_path) -> None:
    r = run_cli("train", *tiny, *_s3(s3_bucket, "no-such-bucket"), f"run.dir={tmp_path / 'r'}", env=_env())
    assert r.returncode == 2, r.stderr
    assert "storage.bucket" in r.stderr and "no-such-bucket" in r.stderr
    assert "smoke" not in r.stdout.lower() and "Traceback" not in r.stderr


def test_an_unreachable_endpoint_is_a_runtime_error_saying_so(s3_bucket: S3Bucket, tiny, tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["storage=s3", "storage.bucket=b", f"storage.endpoint_url=http://127.0.0.1:{port}"]
    r = run_cli("train", *tiny, *args, f"run.dir={tmp_path / 'r'}", env=_env())
    assert r.returncode == 1, r.stderr
    assert "could not connect to" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("resume", "s3://b/greenrun/run1", f"storage.endpoint_url=http://127.0.0.1:{port}", env=_env())
    assert r.returncode == 1 and "could not connect to" in r.stderr, r.stderr
    assert "no greenrun run there" not in r.stderr


def test_a_run_dir_that_is_a_file_or_cannot_be_created_is_a_config_error(tiny, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    r = run_cli("train", *tiny, f"run.dir={a_file}")
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert a_file.read_text() == "mine"
    r = run_cli("train", *tiny, f"run.dir={a_file}/below")  # a path under a file: cannot exist
    assert r.returncode == 2 and "run.dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("train", *tiny, "run.dir=/proc/greenrun-run")  # read-only even for root
    assert r.returncode == 2 and "run.dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
