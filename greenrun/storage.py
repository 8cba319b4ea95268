"""Where checkpoints live: a local directory or an S3-compatible bucket, behind one small interface.

Checkpoints must survive spot preemption, so every write is all-or-nothing (os.replace locally; one PUT or
an aborted-on-failure multipart upload on S3) and commit markers use ``if_none_match`` so one writer wins.
S3 credentials come only from boto3's default chain; no config field holds them and nothing logs them.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)

KINDS = ("local", "s3")
RETRY_MODES = ("standard", "adaptive")
MIN_PART_SIZE_MB = 8  # every part but the last has exactly part_size_mb; R2 wants equal parts, AWS >= 5 MiB
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60  # a 16 MiB part on a slow link still answers well within this
_MIB = 1024 * 1024
_TMP_PREFIX = ".greenrun-tmp-"  # local temp files; list() hides them, abort_stale_uploads() removes them
_KEY_RE = re.compile(r"[A-Za-z0-9._/=-]+")
_SDK_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")
# Error codes that mean "these credentials may not do this", as opposed to "this does not exist".
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
_ACCESS_CODES |= {"InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}


@dataclass
class StorageConfig:
    kind: str = "local"  # local | s3
    bucket: str = ""  # S3 bucket name, required for kind=s3 (no s3:// and no slashes)
    prefix: str = ""  # key prefix under which runs live, e.g. "greenrun" ("" = bucket root)
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, R2, a test server); None = AWS
    region: str | None = None  # e.g. us-east-1; None = from the default chain (AWS_DEFAULT_REGION, ~/.aws)
    retry_mode: str = "standard"  # standard | adaptive (adaptive also slows down on SlowDown throttling)
    max_attempts: int = 10  # tries per S3 request, the first included (>= 1)
    part_size_mb: int = 16  # MiB per multipart part, fixed; bigger files go up in parts (>= 8)
    max_concurrency: int = 4  # parts uploaded / ranges downloaded in parallel (>= 1)


class CommitConflict(Exception):
    """An ``if_none_match=True`` write found the object already there: another writer won."""


class StorageError(Exception):
    """A storage operation failed for a reason other than a commit conflict; the message says why."""


class ObjectNotFound(StorageError):
    """get / get_bytes of a key that holds no object."""


class Storage(Protocol):
    """Keys are '/'-separated and relative; each backend adds its own root or prefix."""

    def put(self, key: str, src: Path, *, if_none_match: bool = False) -> None: ...
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None: ...
    def get(self, key: str, dst: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str) -> list[str]: ...  # every key under prefix (plain string prefix), sorted
    def delete(self, key: str) -> None: ...  # a missing key is not an error
    def exists(self, key: str) -> bool: ...
    def url(self, key: str) -> str: ...  # for messages only
    def abort_stale_uploads(self, prefix: str) -> int: ...  # leftovers of interrupted writes; returns count


def check_key(key: str) -> str:
    """Return key if it is a safe relative key, else raise ValueError naming it."""
    # The pattern already excludes backslashes and NUL; empty and '.' segments would alias other keys.
    if (
        not _KEY_RE.fullmatch(key)
        or key.startswith("/")
        or ".." in key
        or any(part in ("", ".") for part in key.split("/"))
    ):
        raise ValueError(
            f"invalid storage key {key!r}: keys are relative '/'-separated paths of A-Z a-z 0-9 . _ = - "
            "without '..', backslashes, NUL or empty segments"
        )
    return key


def _check_prefix(prefix: str) -> str:
    if prefix.rstrip("/"):
        check_key(prefix.rstrip("/"))
    return prefix


class LocalStorage:
    """Objects are files under root; writes go to a temp file in the same directory, then os.replace."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside root could point elsewhere
            raise ValueError(f"invalid storage key {key!r}: it resolves outside {self.root}")
        return path

    def put(self, key: str, src: Path, *, if_none_match: bool = False) -> None:
        dst = self._path(key)
        with open(src, "rb") as f:
            _atomic_write(dst, lambda out: shutil.copyfileobj(f, out, _MIB), exclusive=if_none_match)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        _atomic_write(self._path(key), lambda out: out.write(data), exclusive=if_none_match)

    def get(self, key: str, dst: Path) -> None:
        try:
            with open(self._path(key), "rb") as f:
                _atomic_write(Path(dst), lambda out: shutil.copyfileobj(f, out, _MIB))
        except FileNotFoundError:
            raise ObjectNotFound(f"no object at {self.url(key)}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object at {self.url(key)}") from None

    def list(self, prefix: str) -> list[str]:
        start = self.root / _check_prefix(prefix).rpartition("/")[0]  # deepest directory the prefix names
        keys = []
        for dirpath, _, filenames in os.walk(start):
            for name in filenames:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if not name.startswith(_TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str) -> str:
        return str(self._path(key))

    def abort_stale_uploads(self, prefix: str) -> int:
        start = self.root / _check_prefix(prefix).rpartition("/")[0]
        stale = [Path(d, n) for d, _, names in os.walk(start) for n in names if n.startswith(_TMP_PREFIX)]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _atomic_write(dst: Path, fill: Callable[[IO[bytes]], Any], *, exclusive: bool = False) -> None:
    """Write dst completely or not at all; with exclusive, fail with CommitConflict if dst exists."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=_TMP_PREFIX)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make checkpoints unreadable to other users
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())  # data must be on disk before the name points at it
        if exclusive:
            try:
                os.link(tmp, dst)  # atomic create-if-absent of a complete file: exactly one writer wins
            except FileExistsError:
                raise CommitConflict(f"{dst} already exists") from None
        else:
            os.replace(tmp, dst)
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the new name itself survive a crash
        finally:
            os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if not match:
        raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket or s3://bucket/some/prefix)")
    return match.group(1), match.group(2).strip("/")


def validate(cfg: StorageConfig) -> list[str]:
    """Problems with cfg, one readable sentence each; empty when it is usable."""
    problems = []
    if cfg.kind not in KINDS:
        close = difflib.get_close_matches(cfg.kind.lower(), KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"storage.kind={cfg.kind!r} is not one of {', '.join(KINDS)}{hint}")
    if cfg.kind == "s3" and cfg.bucket in ("", "???"):
        problems.append("storage.bucket is required for storage=s3 (e.g. storage.bucket=my-bucket)")
    elif "/" in cfg.bucket:
        problems.append(
            f"storage.bucket={cfg.bucket!r} must be a bare bucket name; put s3://bucket/prefix "
            "into storage.bucket=bucket storage.prefix=prefix"
        )
    try:
        _check_prefix(cfg.prefix.strip("/"))
    except ValueError as e:
        problems.append(f"storage.prefix: {e}")
    if cfg.part_size_mb < MIN_PART_SIZE_MB:
        problems.append(f"storage.part_size_mb={cfg.part_size_mb} must be >= {MIN_PART_SIZE_MB}")
    if cfg.retry_mode not in RETRY_MODES:
        problems.append(f"storage.retry_mode={cfg.retry_mode!r} is not one of {', '.join(RETRY_MODES)}")
    if cfg.max_attempts < 1:
        problems.append(f"storage.max_attempts={cfg.max_attempts} must be >= 1")
    if cfg.max_concurrency < 1:
        problems.append(f"storage.max_concurrency={cfg.max_concurrency} must be >= 1")
    return problems


def build(cfg: StorageConfig, local_root: Path) -> Storage:
    """The storage backend cfg asks for; local_root is where kind=local keeps its files."""
    problems = validate(cfg)
    if problems:
        raise ValueError("invalid storage config: " + "; ".join(problems))
    return LocalStorage(local_root) if cfg.kind == "local" else S3Storage(cfg)


# Imported last: the S3 backend builds on the names above, and `storage.S3Storage` stays where callers look.
from greenrun.s3 import S3Storage  # noqa: E402
