"""The one atomic-write helper: a file is either its old content or its new content, never half of each."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".greenrun-tmp-"  # temp files of interrupted writes; listings skip them, cleanup removes them


class Exists(FileExistsError):
    """An exclusive write found the destination already there: another writer won."""


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
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
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
