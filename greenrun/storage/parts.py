"""Pieces of the S3 backend: part uploads on daemon threads that a cancel stops, and reading botocore errors."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

from greenrun.storage.base import UploadCancelled

_POLL_S = 0.05  # how often a waiting upload looks at its cancel event


def check_cancel(cancel: threading.Event | None, full: str) -> None:
    if cancel is not None and cancel.is_set():
        raise UploadCancelled(f"upload of {full} cancelled")


class Parts:
    """Parts 1..count sent by up to `workers` daemon threads, lowest number first.

    Daemon threads, not a ThreadPoolExecutor: the interpreter joins executor threads at exit, so a part
    stuck on a slow link would keep a preempted process alive past its deadline. No new part starts after
    the first error, a cancel or stop(); `wait` returns when the threads are done or `cancel` is set.
    """

    def __init__(
        self, send: Callable[[int], dict], count: int, workers: int, cancel: threading.Event | None
    ) -> None:
        self._send, self._count, self._cancel = send, count, cancel
        self._next, self._stopped = 1, False
        self._cond = threading.Condition()
        self.results: dict[int, dict] = {}
        self.error: BaseException | None = None
        self.running = min(workers, count)
        for _ in range(self.running):
            threading.Thread(target=self._work, name="greenrun-upload", daemon=True).start()

    def _take(self) -> int | None:
        with self._cond:
            cancelled = self._cancel is not None and self._cancel.is_set()
            if self._stopped or cancelled or self.error is not None or self._next > self._count:
                self.running -= 1
                self._cond.notify_all()
                return None
            self._next += 1
            return self._next - 1

    def _work(self) -> None:
        while (number := self._take()) is not None:
            try:
                result = self._send(number)
            except BaseException as e:  # recorded for the waiting thread, which raises it
                with self._cond:
                    if self.error is None:
                        self.error = e
                continue  # _take sees the error and ends this thread
            with self._cond:
                self.results[number] = result

    def wait(self) -> None:
        with self._cond:
            while self.running and not (self._cancel is not None and self._cancel.is_set()):
                self._cond.wait(_POLL_S if self._cancel is not None else None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True

    def drain(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.running == 0, timeout)


def code_of(e: Exception) -> str | None:
    return (getattr(e, "response", None) or {}).get("Error", {}).get("Code")  # some BotoCoreErrors hold None


def status_of(e: Exception) -> int | None:
    return (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def was_retried(e: Exception) -> bool:
    """True when botocore had retried: a 412 may then answer our own first attempt that did land."""
    return (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0


def multipart_etag(parts: list[dict]) -> str | None:
    """S3's ETag for a completed multipart upload: md5 of the parts' binary md5s, then -<count>."""
    try:
        digests = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in parts)
    except ValueError:  # not md5 hex (e.g. SSE-KMS): cannot tell, so treat as someone else's object
        return None
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"
