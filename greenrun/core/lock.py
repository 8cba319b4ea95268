"""One writer per run directory: an exclusive flock on `<run dir>/.greenrun.lock`.

The kernel drops a flock when its holder dies (kill -9 included), so a lock left by a crashed run is never
stale: the next writer simply gets it. The file holds the holder's pid, host and start time, for the message
that refuses a second writer. The file itself is never deleted: unlinking a lock file lets two processes
lock two different inodes of the same name.

Taking the lock again in the process that holds it succeeds (it counts), so `job.train` can lock a directory
that `job.resume` already locked. flock works across the machines of an NFSv4 mount (Linux maps it to a
byte-range lock); temp directory names carry `pid@host` too (`owner_tag`) so that cleanup code can leave a
live writer on another machine alone even where locks do not reach.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

from greenrun.core.fs import refuse_symlink

try:
    import fcntl
except ImportError:  # Windows has no flock: one writer is then up to the user
    fcntl = None

LOCK_NAME = ".greenrun.lock"


class Busy(RuntimeError):
    """Another live process holds the directory's lock."""

    def __init__(self, directory: Path, holder: dict):
        self.directory, self.holder = directory, holder
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        since = holder.get("since")
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        super().__init__(
            f"{directory} is in use by another greenrun process (pid {pid} on host {host}{when}), which holds "
            f"{LOCK_NAME}: one writer per run directory. Wait for it to finish, or use another run.dir"
        )


def hostname() -> str:
    """This machine's name as it appears in lock files and temp directory names (no '/' or odd characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"


def owner_tag() -> str:
    """`pid@host` of this process, for names of temp files and directories it is writing."""
    return f"{os.getpid()}@{hostname()}"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a reused pid reads as alive: the safe side)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class _Entry:
    def __init__(self, fd: int):
        self.fd, self.count = fd, 0


_held: dict[Path, _Entry] = {}
_guard = threading.Lock()  # the registry is per process; threads of one process share the lock


def _key(directory: Path) -> Path:
    return Path(os.path.abspath(Path(directory).expanduser())).resolve()


def held(directory: Path) -> bool:
    """Whether this process holds the lock of `directory`."""
    with _guard:
        return _key(directory) in _held


class Held:
    """A hold on a directory's lock; `release()`, or the end of `with acquire(d):`, gives it back (once)."""

    def __init__(self, key: Path):
        self._key: Path | None = key

    def release(self) -> None:
        with _guard:
            if self._key is None:
                return
            entry = _held[self._key]
            entry.count -= 1
            if entry.count == 0:
                del _held[self._key]
                if fcntl is not None:
                    # LOCK_UN first: a forked child that inherited the descriptor must not keep the lock.
                    fcntl.flock(entry.fd, fcntl.LOCK_UN)
                os.close(entry.fd)
            self._key = None

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def acquire(directory: Path) -> Held:
    """Lock `directory` (made if missing) for this process, or raise Busy naming the live holder.

    Never waits. A symlinked lock file is refused (UnsafePath): the holder's details would land in its target.
    """
    directory = Path(directory)
    key = _key(directory)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / LOCK_NAME
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    refuse_symlink(path)
                raise
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise Busy(directory, _read_holder(fd)) from None
                info = {"pid": os.getpid(), "host": hostname(), "since": round(time.time(), 3)}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            entry = _held[key] = _Entry(fd)
        entry.count += 1
    return Held(key)
