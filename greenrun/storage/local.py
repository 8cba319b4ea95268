"""Storage in a local directory: objects are files under a root, written atomically."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from greenrun.core.fs import TMP_PREFIX, Exists, atomic_write
from greenrun.storage.base import (
    BACKENDS,
    CommitConflict,
    Data,
    ObjectNotFound,
    StorageAccessError,
    StorageConfig,
    UploadCancelled,
    check_key,
    check_prefix,
)

_MIB = 1024 * 1024


@BACKENDS.register("local")
class LocalStorage:
    """Objects are files under root; writes go to a temp file in the same directory, then os.replace."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_config(cls, cfg: StorageConfig, local_root: Path) -> LocalStorage:
        return cls(local_root)

    @staticmethod
    def config_problems(cfg: StorageConfig) -> list[str]:
        return []

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside root could point elsewhere
            raise ValueError(f"invalid storage key {key!r}: it resolves outside {self.root}")
        return path

    def put(
        self, key: str, src: Path, *, if_none_match: bool = False, cancel: threading.Event | None = None
    ) -> None:
        dst = self._path(key)
        with open(src, "rb") as f:
            _write(dst, lambda out: _copy(f.read, out, cancel, dst), exclusive=if_none_match)

    def put_bytes(
        self, key: str, data: Data, *, if_none_match: bool = False, cancel: threading.Event | None = None
    ) -> None:
        dst, view = self._path(key), memoryview(data).cast("B")
        chunks = (view[i : i + _MIB] for i in range(0, len(view), _MIB))
        _write(dst, lambda out: _copy(lambda n: next(chunks, b""), out, cancel, dst), exclusive=if_none_match)

    def get(self, key: str, dst: Path) -> None:
        try:
            with open(self._path(key), "rb") as f:
                atomic_write(Path(dst), lambda out: shutil.copyfileobj(f, out, _MIB))
        except FileNotFoundError:
            raise ObjectNotFound(f"no object at {self.url(key)}") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object at {self.url(key)}") from None

    def list(self, prefix: str) -> list[str]:
        start = self.root / check_prefix(prefix).rpartition("/")[0]  # deepest directory the prefix names
        keys = []
        for dirpath, _, filenames in os.walk(start):
            for name in filenames:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # An object store has no directories: one emptied by this delete goes too, up to the root.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:  # not empty, or already gone
                break

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def url(self, key: str) -> str:
        return str(self._path(key))

    def abort_stale_uploads(self, prefix: str) -> int:
        start = self.root / check_prefix(prefix).rpartition("/")[0]
        stale = [Path(d, n) for d, _, names in os.walk(start) for n in names if n.startswith(TMP_PREFIX)]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def storage_classes(self) -> tuple[str, ...]:
        return ()  # a file has no storage class

    def set_storage_class(self, key: str, storage_class: str) -> bool:
        self._path(key)  # a bad key is refused here as everywhere else
        return False

    def check_access(self) -> None:
        """The root (or, before it exists, the nearest directory above it) is a directory we may write in."""
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        if not existing.is_dir():
            raise StorageAccessError(f"cannot write under {self.root}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageAccessError(
                f"cannot write under {self.root}: {existing} is not writable by this user"
            )


def _copy(read: Callable[[int], Any], out: IO[bytes], cancel: threading.Event | None, dst: Path) -> None:
    """Copy chunks of `read` into out, stopping between chunks once `cancel` is set (atomic_write then
    removes the temp file, so a cancelled put leaves nothing)."""
    while chunk := read(_MIB):
        if cancel is not None and cancel.is_set():
            raise UploadCancelled(f"write of {dst} cancelled")
        out.write(chunk)


def _write(dst: Path, data: bytes | Callable[[IO[bytes]], Any], *, exclusive: bool) -> None:
    try:
        atomic_write(dst, data, exclusive=exclusive)
    except Exists as e:
        raise CommitConflict(str(e)) from None
