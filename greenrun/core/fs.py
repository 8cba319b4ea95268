"""The one atomic-write helper: a file is either its old content or its new content, never half of each.

Nothing here writes through a symlink: a link planted in a run directory (config.yaml -> ~/.bashrc) would
otherwise make greenrun overwrite or append to a file outside it. Such a write raises `UnsafePath` instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".greenrun-tmp-"  # temp files of interrupted writes; listings skip them, cleanup removes them


class Exists(FileExistsError):
    """An exclusive write found the destination already there: another writer won."""


class UnsafePath(OSError):
    """A write would go through a symlink (or into something that is not a regular file): refused."""


def refuse_symlink(path: Path) -> None:
    """Raise UnsafePath if `path` itself is a symlink (a missing path is fine: it will be created)."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePath(
            f"{path} is a symlink (to {os.readlink(path)}); greenrun never writes through a link, "
            "so the file it points at stays as it is: remove the link"
        )


def append(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Append to a regular file, creating it; a symlink or a FIFO/device at `path` is refused."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symlink
            refuse_symlink(path)
        if e.errno == errno.ENXIO:  # O_NONBLOCK on a FIFO nobody reads
            raise UnsafePath(
                f"{path} is not a regular file; greenrun appends only to files it made"
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # O_NONBLOCK kept a FIFO from blocking us here
            raise UnsafePath(f"{path} is not a regular file; greenrun appends only to files it made")
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:  # a write may take fewer bytes than asked
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name inside `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    dst: Path, data: bytes | str | Callable[[IO[bytes]], Any], *, exclusive: bool = False, mode: int = 0o644
) -> None:
    """Write `dst` completely or not at all: a temp file in the same directory, fsync, then rename.

    `data` is bytes, text (UTF-8) or a function that fills the open binary file. With `exclusive`, the
    write fails with `Exists` when `dst` is already there (a hard link is an atomic create-if-absent).
    A symlinked `dst` is refused (UnsafePath). The temp file is made with O_CREAT|O_EXCL under a random
    name (mkstemp), which never opens an existing path, a planted symlink included.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    refuse_symlink(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=TMP_PREFIX)
    try:
        os.fchmod(fd, mode)  # mkstemp's 0600 would hide checkpoints from other users of the machine
        with os.fdopen(fd, "wb") as out:
            if callable(data):
                data(out)
            else:
                out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())  # the bytes must be on disk before a name points at them
        if exclusive:
            try:
                os.link(tmp, dst)
            except FileExistsError:
                raise Exists(f"{dst} already exists") from None
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
