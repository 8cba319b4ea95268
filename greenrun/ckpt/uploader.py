"""Background uploads of committed checkpoints; after each commit the run's Retention is applied remotely.

Every checkpoint handed over ends with one UploadResult whose outcome is committed, failed or skipped;
`report()` counts them for summary.json and says whether the newest checkpoint reached the bucket.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from greenrun.ckpt import checkpoint
from greenrun.ckpt.remote import COMMITTED, FAILED, SKIPPED, Remote, UploadResult
from greenrun.ckpt.retention import Retention
from greenrun.storage.base import UploadCancelled

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
        self.newest_at_start: int | None = None  # the newest step the bucket held when this process began
        self._cond = threading.Condition()
        self._pending: tuple[int, Path] | None = None
        self._current: int | None = None
        self._cancel = threading.Event()  # set by abandon(): the upload in flight stops and cleans up
        self._abandoned: tuple[str, str] | None = None  # (outcome, why) for what abandon() stopped
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
                step = int(match[1]) if match else -1
                self._add(UploadResult(step, 0, 0.0, False, f"upload of {local_dir} refused: {why}", SKIPPED))
                return
            new = (int(match[1]), local_dir)
            if self._pending is not None:
                old, new = sorted([self._pending, new], key=lambda item: item[0])
                note = f"upload of step {old[0]} skipped: step {new[0]} is newer"
                self._add(UploadResult(old[0], 0, 0.0, False, note, SKIPPED))
            self._pending = new
            self._cond.notify_all()

    def record(self, result: UploadResult) -> None:
        """Count an upload done outside this thread (the emergency upload) with the others."""
        with self._cond:
            self._add(result)

    def _add(self, result: UploadResult) -> None:
        self.results.append(result)
        if result.outcome == FAILED:
            log.warning("checkpoint step %d did not reach the bucket: %s", result.step, result.note)

    def in_flight_steps(self) -> set[int]:
        """Steps uploading or pending: pass them to prune(protect=...) so their prefixes survive."""
        with self._cond:
            return {s for s in (self._current, self._pending and self._pending[0]) if s is not None}

    def wait(self, timeout: float | None = None) -> bool:
        """True once nothing is in flight or pending (which says nothing about success: see report())."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and self._current is None, timeout)

    def abandon(self, why: str, outcome: str = FAILED) -> None:
        """Stop now: the upload in flight is cancelled (its multipart upload aborted, its files deleted) and
        counted as `outcome`; a pending one is skipped; later submits are refused. Returns at once."""
        with self._cond:
            self._closing = True
            self._abandoned = (outcome, why)
            if self._pending is not None:
                step, _ = self._pending
                self._add(
                    UploadResult(step, 0, 0.0, False, f"upload of step {step} not attempted: {why}", SKIPPED)
                )
                self._pending = None
            self._cancel.set()
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was submitted (up to timeout), then stop; True if the thread has ended.

        What has not finished by then is abandoned, so no upload outlives the process's intent to end.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abandon("still running when the uploader closed")
            self._thread.join(0.0 if timeout == 0 else 1.0)  # 0: the process is ending now (a preemption)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            steps = self.remote.steps()
            self.newest_at_start = steps[0] if steps else None
        except Exception as e:  # only for the report; the uploads say what is wrong soon enough
            log.debug("could not list the bucket's checkpoints: %s", e)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                (step, path), self._pending = self._pending, None
                self._current = step
            t0 = time.monotonic()
            try:
                result = self.remote.upload_checkpoint(path, cancel=self._cancel)
            except UploadCancelled:
                outcome, why = self._abandoned or (FAILED, "cancelled")
                result = UploadResult(
                    step, 0, time.monotonic() - t0, False, f"upload abandoned: {why}", outcome
                )
            except Exception as e:  # recorded, never raised: training must outlive a failed upload
                where = self.remote.storage.url(self.remote.manifest_key(step))
                # StorageError messages name the key and endpoint only; credentials never reach them.
                log.warning("upload of step %d to %s failed: %s", step, where, e)
                result = UploadResult(step, 0, time.monotonic() - t0, False, f"upload failed: {e}")
            if result.committed and self.retention is not None and not self._cancel.is_set():
                try:
                    keep = self.retention
                    self.remote.prune(keep.keep_last, keep.keep_best, protect=self.in_flight_steps() | {step})
                except Exception as e:  # retention is housekeeping: never let it stop uploads
                    log.warning("remote retention after step %d failed: %s", step, e)
            with self._cond:
                self.results.append(result)  # a failure was logged above, with where it went
                self._current = None
                self._cond.notify_all()

    # --- what reached the bucket ---------------------------------------------------------------------

    def report(self, newest_step: int | None) -> dict[str, Any]:
        """Counts by outcome, the newest step safe in the bucket, and whether `newest_step` (the newest
        checkpoint this process wrote) is among the safe ones. For summary.json; call after wait()."""
        with self._cond:
            results = [r for r in self.results if r.step >= 0]
        committed = [r.step for r in results if r.outcome == COMMITTED]
        known = [s for s in (*committed, self.newest_at_start) if s is not None]
        newest_remote = max(known, default=None)
        safe = newest_step is None or (newest_remote is not None and newest_remote >= newest_step)
        counts = {kind: sum(r.outcome == kind for r in results) for kind in (COMMITTED, FAILED, SKIPPED)}
        return {
            **counts,
            "newest_committed_step": newest_remote,
            "newest_committed_url": None if newest_remote is None else self.step_url(newest_remote),
            "newest_local_step": newest_step,
            "safe": safe,
            "checkpoints": [
                {
                    "step": r.step,
                    "outcome": r.outcome,
                    "bytes": r.bytes,
                    "seconds": round(r.seconds, 3),
                    "note": r.note,
                }
                for r in results
            ],
        }

    def step_url(self, step: int) -> str:
        return self.remote.storage.url(self.remote.manifest_key(step))


def describe(report: dict[str, Any] | None) -> tuple[bool, str]:
    """(safe, one line for the console) of an Uploader.report(); storage=local (None) is always safe."""
    if report is None:
        return True, ""
    counts = f"{report[COMMITTED]} committed, {report[FAILED]} failed, {report[SKIPPED]} skipped"
    newest, local = report["newest_committed_step"], report["newest_local_step"]
    where = "none" if newest is None else f"step {newest} ({report['newest_committed_url']})"
    if report["safe"]:
        return True, f"checkpoint uploads: {counts}; newest in the bucket: {where}"
    return False, (
        f"the newest checkpoint (step {local}) is NOT in the bucket, only on this machine's disk "
        f"(uploads: {counts}); the newest checkpoint safe in the bucket: {where}"
    )
