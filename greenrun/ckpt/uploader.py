"""Background uploads of committed checkpoints; after each commit the run's Retention is applied remotely."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from greenrun.ckpt import checkpoint
from greenrun.ckpt.remote import Remote, UploadResult
from greenrun.ckpt.retention import Retention

log = logging.getLogger("greenrun.ckpt.remote")


class Uploader:
    """Uploads committed checkpoints on a background thread so training never waits on the network.

    At most one upload in flight and one pending: a newer submit replaces the pending one, because only
    the newest checkpoint matters for a resume and an unbounded queue would grow behind a slow link.
    """

    def __init__(self, remote: Remote, retention: Retention | None = None) -> None:
        self.remote = remote
        # Applied after each commit (None = keep everything): a long run must not keep every 1.5 GB checkpoint.
        self.retention = retention
        self.results: list[UploadResult] = []
        self._cond = threading.Condition()
        self._pending: tuple[int, Path] | None = None
        self._current: int | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="greenrun-uploader", daemon=True)
        self._thread.start()

    def submit(self, local_dir: Path) -> None:
        """Queue a committed checkpoint directory (step-<N>); returns at once and never raises."""
        local_dir = Path(local_dir)
        match = checkpoint.STEP_DIR.match(local_dir.name)
        with self._cond:
            if match is None or self._closing:
                why = "the uploader is closed" if match else "not a step-<N> checkpoint directory"
                self.results.append(UploadResult(-1, 0, 0.0, False, f"upload of {local_dir} refused: {why}"))
                return
            new = (int(match[1]), local_dir)
            if self._pending is not None:
                old, new = sorted([self._pending, new], key=lambda item: item[0])
                note = f"upload of step {old[0]} skipped: step {new[0]} is newer"
                self.results.append(UploadResult(old[0], 0, 0.0, False, note))
            self._pending = new
            self._cond.notify_all()

    def in_flight_steps(self) -> set[int]:
        """Steps uploading or pending: pass them to prune(protect=...) so their prefixes survive."""
        with self._cond:
            return {s for s in (self._current, self._pending and self._pending[0]) if s is not None}

    def wait(self, timeout: float | None = None) -> bool:
        """True once nothing is in flight or pending."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and self._current is None, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was submitted (up to timeout), then stop; True if the thread has ended."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                (step, path), self._pending = self._pending, None
                self._current = step
            t0 = time.monotonic()
            try:
                result = self.remote.upload_checkpoint(path)
            except Exception as e:  # recorded, never raised: training must outlive a failed upload
                where = self.remote.storage.url(self.remote.manifest_key(step))
                # StorageError messages name the key and endpoint only; credentials never reach them.
                log.warning("upload of step %d to %s failed: %s", step, where, e)
                result = UploadResult(step, 0, time.monotonic() - t0, False, f"upload failed: {e}")
            if result.committed and self.retention is not None:
                try:
                    keep = self.retention
                    self.remote.prune(keep.keep_last, keep.keep_best, protect=self.in_flight_steps() | {step})
                except Exception as e:  # retention is housekeeping: never let it stop uploads
                    log.warning("remote retention after step %d failed: %s", step, e)
            with self._cond:
                self.results.append(result)
                self._current = None
                self._cond.notify_all()
