"""Where checkpoints live: a local directory or an S3-compatible bucket, behind one small interface.

Checkpoints must survive spot preemption, so every write is all-or-nothing (os.replace locally; one PUT or
an aborted-on-failure multipart upload on S3) and commit markers use ``if_none_match`` so one writer wins.
S3 credentials come only from boto3's default chain; no config field holds them and nothing logs them.

Each backend registers itself in BACKENDS under its `storage.kind` where its class is defined; importing
the modules below is what registers them.
"""

from __future__ import annotations

from pathlib import Path

from greenrun.core import checks
from greenrun.runtime import budget
from greenrun.storage.base import (
    BACKENDS,
    MIN_PART_SIZE_MB,
    RETRY_MODES,
    Backend,
    CommitConflict,
    ObjectNotFound,
    Storage,
    StorageAccessError,
    StorageConfig,
    StorageError,
    StorageUnreachable,
    UploadCancelled,
    access_problems,
    check_key,
    check_prefix,
    parse_s3_url,
)
from greenrun.storage.local import LocalStorage
from greenrun.storage.s3 import S3Storage

__all__ = [
    "BACKENDS",
    "Backend",
    "CommitConflict",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageAccessError",
    "StorageConfig",
    "StorageError",
    "StorageUnreachable",
    "UploadCancelled",
    "access_problems",
    "build",
    "check_key",
    "parse_s3_url",
    "validate",
]


def validate(cfg: StorageConfig) -> list[str]:
    """Problems with cfg, one readable sentence each; empty when it is usable."""
    problems = BACKENDS.problems(cfg.kind)
    if not problems:
        problems += BACKENDS.get(cfg.kind).config_problems(cfg)
    if "/" in cfg.bucket:
        problems.append(
            f"storage.bucket={cfg.bucket!r} must be a bare bucket name; put s3://bucket/prefix "
            "into storage.bucket=bucket storage.prefix=prefix"
        )
    try:
        check_prefix(cfg.prefix.strip("/"))
    except ValueError as e:
        problems.append(f"storage.prefix: {e}")
    if cfg.part_size_mb < MIN_PART_SIZE_MB:
        problems.append(f"storage.part_size_mb={cfg.part_size_mb} must be >= {MIN_PART_SIZE_MB}")
    problems += checks.choice("storage.retry_mode", cfg.retry_mode, RETRY_MODES)
    if cfg.max_attempts < 1:
        problems.append(f"storage.max_attempts={cfg.max_attempts} must be >= 1")
    if cfg.max_concurrency < 1:
        problems.append(f"storage.max_concurrency={cfg.max_concurrency} must be >= 1")
    problems += budget.upload_problems(cfg.max_failed_uploads, cfg.on_failed_uploads)
    problems += checks.http_url(
        "storage.endpoint_url",
        cfg.endpoint_url,
        "storage.endpoint_url=https://<account>.r2.cloudflarestorage.com or http://127.0.0.1:9000",
    )
    return problems


def build(cfg: StorageConfig, local_root: Path) -> Storage:
    """The storage backend cfg asks for; local_root is where kind=local keeps its files."""
    problems = validate(cfg)
    if problems:
        raise ValueError("invalid storage config: " + "; ".join(problems))
    return BACKENDS.get(cfg.kind).from_config(cfg, local_root)
