"""What every storage backend shares: its config, its errors, the Protocol, the BACKENDS registry and the
key rules.

Checkpoints must survive spot preemption, so every write is all-or-nothing (os.replace locally; one PUT or
an aborted-on-failure multipart upload on S3) and commit markers use ``if_none_match`` so one writer wins.
S3 credentials come only from boto3's default chain; no config field holds them and nothing logs them.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from greenrun.core.fields import plain
from greenrun.core.registry import Registry

RETRY_MODES = ("standard", "adaptive")
MIN_PART_SIZE_MB = 8  # every part but the last has exactly part_size_mb; R2 wants equal parts, AWS >= 5 MiB
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60  # a 16 MiB part on a slow link still answers well within this
MIB = 1024 * 1024
KEY_RE = re.compile(r"[A-Za-z0-9._/=-]+")
SDK_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")
# Error codes that mean "these credentials may not do this", as opposed to "this does not exist".
ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
ACCESS_CODES |= {"InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}


@dataclass
class StorageConfig:
    kind: str = plain("local")  # local | s3
    bucket: str = plain("")  # S3 bucket name, required for kind=s3 (no s3:// and no slashes)
    prefix: str = plain("")  # key prefix under which runs live, e.g. "greenrun" ("" = bucket root)
    endpoint_url: str | None = plain(None)  # S3-compatible endpoint (MinIO, R2, a test server); None = AWS
    region: str | None = plain(None)  # e.g. us-east-1; None = the default chain (AWS_DEFAULT_REGION, ~/.aws)
    retry_mode: str = plain("standard")  # standard | adaptive (adaptive also backs off when throttled)
    max_attempts: int = plain(10)  # tries per S3 request, the first included (>= 1)
    part_size_mb: int = plain(16)  # MiB per multipart part, fixed; bigger files go up in parts (>= 8)
    max_concurrency: int = plain(4)  # parts uploaded / ranges downloaded in parallel (>= 1)
    max_failed_uploads: int = plain(3)  # checkpoint uploads failed in a row before acting (0 = never act)
    on_failed_uploads: str = plain("warn")  # warn | stop (stop: commit a checkpoint here, end the run)


class CommitConflict(Exception):
    """An ``if_none_match=True`` write found the object already there: another writer won."""


class StorageError(Exception):
    """A storage operation failed for a reason other than a commit conflict; the message says why."""


class ObjectNotFound(StorageError):
    """get / get_bytes of a key that holds no object."""


class StorageAccessError(StorageError):
    """The storage answered, and the configuration is wrong: no such bucket, refused credentials, a read-only
    root. Fixing it means changing storage.* or the credentials, so callers report it as a usage error."""


class StorageUnreachable(StorageError):
    """The endpoint could not be reached at all (DNS, refused connection, timeout): the network, not the config."""


class UploadCancelled(StorageError):
    """A put was cancelled through its `cancel` event; a multipart upload it had started is aborted."""


# What put_bytes accepts: anything with the buffer protocol (bytes, a memoryview of an mmap).
Data = bytes | bytearray | memoryview


class Storage(Protocol):
    """Keys are '/'-separated and relative; each backend adds its own root or prefix."""

    # `cancel`, once set, makes a put stop as soon as it can and raise UploadCancelled; nothing it started
    # stays behind (a multipart upload is aborted, a local temp file removed).
    def put(
        self, key: str, src: Path, *, if_none_match: bool = False, cancel: threading.Event | None = None
    ) -> None: ...
    def put_bytes(
        self, key: str, data: Data, *, if_none_match: bool = False, cancel: threading.Event | None = None
    ) -> None: ...
    def get(self, key: str, dst: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str) -> list[str]: ...  # every key under prefix (plain string prefix), sorted
    def delete(self, key: str) -> None: ...  # a missing key is not an error
    def exists(self, key: str) -> bool: ...
    def url(self, key: str) -> str: ...  # for messages only
    def abort_stale_uploads(self, prefix: str) -> int: ...  # leftovers of interrupted writes; returns count
    def storage_classes(self) -> tuple[str, ...]: ...  # what set_storage_class accepts; () = no classes
    def set_storage_class(self, key: str, storage_class: str) -> bool: ...  # True if the class changed
    # One cheap call that proves the storage is usable before anything expensive starts. Raises
    # StorageAccessError (bucket, credentials, permissions: a configuration problem) or StorageUnreachable.
    def check_access(self) -> None: ...


class Backend(Storage, Protocol):
    """A Storage class that `storage.kind` can name: it builds itself from the config."""

    @classmethod
    def from_config(cls, cfg: StorageConfig, local_root: Path) -> Storage: ...  # local_root: the run dir
    @staticmethod
    def config_problems(cfg: StorageConfig) -> list[str]: ...  # what this kind alone requires of cfg


# storage.kind -> its class; each backend registers itself where it is defined (local.py, s3.py).
BACKENDS: Registry[type[Backend]] = Registry("storage.kind")


def access_problems(cfg: StorageConfig, local_root: Path) -> list[str]:
    """Configuration problems one cheap call to cfg's storage finds (empty when it answers and accepts us).

    A network failure is not a configuration problem: it raises StorageUnreachable ("could not connect to
    <endpoint>"). Call it after config validation and before the preflight, which takes far longer.
    """
    try:
        BACKENDS.get(cfg.kind).from_config(cfg, local_root).check_access()
    except StorageAccessError as e:
        return [str(e)]
    return []


def check_key(key: str) -> str:
    """Return key if it is a safe relative key, else raise ValueError naming it."""
    # The pattern already excludes backslashes and NUL; empty and '.' segments would alias other keys.
    if (
        not KEY_RE.fullmatch(key)
        or key.startswith("/")
        or ".." in key
        or any(part in ("", ".") for part in key.split("/"))
    ):
        raise ValueError(
            f"invalid storage key {key!r}: keys are relative '/'-separated paths of A-Z a-z 0-9 . _ = - "
            "without '..', backslashes, NUL or empty segments"
        )
    return key


def check_prefix(prefix: str) -> str:
    if prefix.rstrip("/"):
        check_key(prefix.rstrip("/"))
    return prefix


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if not match:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket or s3://bucket/some/prefix)")
    return match.group(1), match.group(2).strip("/")
