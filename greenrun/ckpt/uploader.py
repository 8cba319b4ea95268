"""Background uploads of committed checkpoints; after each commit the run's Retention is applied remotely.

Every checkpoint handed over ends with one UploadResult whose outcome is committed, failed or skipped;
`report()` counts them for summary.json and says whether the newest checkpoint reached the bucket. Each
committed or failed outcome also goes to an UploadHealth (storage.max_failed_uploads failures in a row: one
loud warning, and with storage.on_failed_uploads=stop the `stop_reason` the training loop reads). After each
committed checkpoint and once at close, `run_files` (the mirror's other files: metrics.jsonl, summary.json)
runs on the same thread, best-effort.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from greenrun.ckpt import checkpoint
from greenrun.ckpt.remote import COMMITTED, FAILED, SKIPPED, Remote, UploadResult
from greenrun.ckpt.retention import Retention
from greenrun.runtime.budget import UploadHealth
from greenrun.storage.base import UploadCancelled

log = logging.getLogger("greenrun.ckpt.remote")


class Uploader:
    """Uploads committed checkpoints on a background thread so training never waits on the network.

    At most one upload in flight and one pending: a newer submit replaces the pending one, because only
    the newest checkpoint matters for a resume and an unbounded queue would grow behind a slow link.
    """

    def __init__(
        self,
        remote: Remote,
        retention: Retention | None = None,
        *,
        health: UploadHealth | None = None,  # failures in a row -> warn or stop (None = never act)
        run_files: Callable[[threading.Event], None] | None = None,  # sends the run's other files
    ) -> None:
        self.remote = remote
        # Applied after each commit (None = keep everything): a long run must not keep every 1.5 GB checkpoint.
        self.retention = retention
        self.health = health
        self.run_files = run_files
        self._stop_reason: str | None = None  # the health's stop (on_failed_uploads=stop); a commit clears it
        self._last_ok: bool | None = None  # the newest committed-or-failed outcome (None: none yet)
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

    def _add(self, result: UploadResult, logged: bool = False) -> None:
        """Count one checkpoint's outcome (under self._cond) and tell the health about it."""
        self.results.append(result)
        if result.outcome == FAILED and not logged:
            log.warning("checkpoint step %d did not reach the bucket: %s", result.step, result.note)
        if result.outcome == SKIPPED or result.step < 0:
            return  # never tried: says nothing about the bucket
        ok = result.outcome == COMMITTED
        self._last_ok = ok
        if self.health is None:
            return
        decision = self.health.observe(ok)
        if ok:
            self._stop_reason = None
            for message in decision.messages:  # "checkpoint uploads succeed again"
                log.warning("%s: step %d committed at %s", message, result.step, self.step_url(result.step))
        elif decision.stop:
            if self._stop_reason is None:  # once: every later failure decides the same
                self._stop_reason = decision.reason
                log.error(self._unhealthy(decision.reason, result, stopping=True))
        elif decision.messages:  # rate-limited by UploadHealth: every max_failed_uploads failures
            log.error(self._unhealthy(decision.messages[0], result, stopping=False))

    def _unhealthy(self, text: str, result: UploadResult, stopping: bool) -> str:
        """The loud line: which bucket, the newest checkpoint safe there, the last error, how to fix it."""
        newest = self._newest_remote()
        unsafe = (
            "no checkpoint of it off this machine: a preemption or a lost disk loses all of it"
            if newest is None
            else f"nothing newer than step {newest} ({self.step_url(newest)}) off this machine: a preemption "
            "or a lost disk loses everything after it"
        )
        then = (
            "stopping (storage.on_failed_uploads=stop): the run commits a checkpoint on this disk and ends"
            if stopping
            else "training goes on; storage.on_failed_uploads=stop would end the run here instead"
        )
        # result.note is a StorageError message: bucket, key and endpoint, never credentials.
        return (
            f"{text}. {self.remote.storage.url(self.remote.run_key)} is not taking checkpoints: this run is "
            f"spending money with {unsafe}. Last error (step {result.step}): {result.note}. Fix: check "
            "storage.bucket, storage.endpoint_url and storage.region, and the credentials boto3's default "
            "chain finds here (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, "
            f"an instance role); {then}"
        )

    @property
    def stop_reason(self) -> str | None:
        """Why the run should stop: storage.max_failed_uploads uploads failed in a row with
        storage.on_failed_uploads=stop. None while uploads are healthy (a committed upload clears it)."""
        with self._cond:
            return self._stop_reason

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
                    break
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
                self._add(result, logged=True)  # a failure was logged above, or by Remote: where it went
            if result.committed:
                self._send_run_files()
            with self._cond:
                self._current = None
                self._cond.notify_all()
        self._send_run_files()  # closing: the end of the run, whose summary.json is written by now

    def _send_run_files(self) -> None:
        """The mirror's other files: not once abandoned, and not while the newest upload failed (the bucket
        is not answering, and trying only delays the next checkpoint or the exit)."""
        if self.run_files is None or self._cancel.is_set() or self._last_ok is False:
            return
        try:
            self.run_files(self._cancel)
        except Exception as e:  # best-effort by contract; this is the last guard
            log.warning("could not mirror the run's files: %s", e)

    # --- what reached the bucket ---------------------------------------------------------------------

    def report(self, newest_step: int | None) -> dict[str, Any]:
        """Counts by outcome, the newest step safe in the bucket, and whether `newest_step` (the newest
        checkpoint this process wrote) is among the safe ones. For summary.json; call after wait()."""
        with self._cond:
            results = [r for r in self.results if r.step >= 0]
            newest_remote, stop_reason = self._newest_remote(), self._stop_reason
        safe = newest_step is None or (newest_remote is not None and newest_remote >= newest_step)
        counts = {kind: sum(r.outcome == kind for r in results) for kind in (COMMITTED, FAILED, SKIPPED)}
        return {
            **counts,
            "newest_committed_step": newest_remote,
            "newest_committed_url": None if newest_remote is None else self.step_url(newest_remote),
            "newest_local_step": newest_step,
            "safe": safe,
            "upload_stop": stop_reason,  # why failed uploads end the run (None: they do not)
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

    def _newest_remote(self) -> int | None:
        """The newest step committed in the bucket: by this process, or found there when it began."""
        committed = [r.step for r in self.results if r.outcome == COMMITTED and r.step >= 0]
        return max((s for s in (*committed, self.newest_at_start) if s is not None), default=None)

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
