"""Storage in a local directory: objects are files under a root, written atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from greenrun.core.fs import TMP_PREFIX, Exists, atomic_write
from greenrun.storage.base import (
    BACKENDS,
    CommitConflict,
    ObjectNotFound,
    StorageConfig,
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

    def put(self, key: str, src: Path, *, if_none_match: bool = False) -> None:
        dst = self._path(key)
        with open(src, "rb") as f:
            _write(dst, lambda out: shutil.copyfileobj(f, out, _MIB), exclusive=if_none_match)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        _write(self._path(key), data, exclusive=if_none_match)

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


def _write(dst: Path, data: bytes | Callable[[IO[bytes]], Any], *, exclusive: bool) -> None:
    try:
        atomic_write(dst, data, exclusive=exclusive)
    except Exists as e:
        raise CommitConflict(str(e)) from None
