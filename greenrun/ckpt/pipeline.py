"""The save pipeline, and the one place that decides when to save.

snapshot (the only part training waits for) -> local commit -> remote upload. Training blocks only while the
state is copied off the device; a background thread writes and commits the local checkpoint, prunes old ones,
and hands the committed directory to the uploader (another thread). The emergency path (preemption, see
emergency.py) cancels older uploads, then writes and uploads the new checkpoint side by side, and gives up on
the upload (aborting it) when the deadline comes.

Every rank holds a Checkpointer so that all of them take the same decision at the same step (`agree` is an
all-reduce under torchrun); only the writer (rank 0) snapshots and writes. With sharded checkpoints
(ckpt/sharded.py) every rank writes its shards inside snapshot_fn, in the training thread; the writer's
background thread then only commits them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig, Snapshot
from greenrun.ckpt.emergency import CLEANUP_S, EXIT_MARGIN_S, Emergency, Staged, Worker
from greenrun.ckpt.remote import FAILED, SKIPPED, UploadResult
from greenrun.ckpt.uploader import Uploader
from greenrun.core.background import OneAtATime

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        cfg: CheckpointConfig,
        ckpt_root: Path,
        *,
        uploader: Uploader | None = None,  # mirrors each committed checkpoint (the writer's only)
        writer: bool = True,  # this process writes (rank 0); the others only take part in decisions
        agree: Callable[[bool], bool] = lambda due: due,  # True on every rank if True on any
        barrier: Callable[[], None] = lambda: None,  # the other ranks wait for the writer's commit
        collective: bool = False,  # every rank runs snapshot_fn (fsdp gathers the state); the writer writes
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.ckpt_root, self.uploader = cfg, Path(ckpt_root), uploader
        self.writer, self.agree, self.barrier, self.clock = writer, agree, barrier, clock
        self.collective = collective
        self.blocked_s: list[float] = []  # seconds the training loop waited, per save
        self.last_committed: Path | None = None
        self.newest_step: int | None = None  # the newest checkpoint this process took (the writer's)
        self._emergency: Emergency | None = None
        self._preempting = False  # an emergency save began (it may not have returned: a second signal)
        # The emergency upload's cancel: set at its deadline, or by abort_emergency().
        self._cancel = threading.Event()
        self._upload_worker: Worker | None = None
        self._last_save = clock()
        self._writer = OneAtATime("greenrun-ckpt")  # a failed write raises at the next save or at close
        if writer:
            removed = checkpoint.clean_stale(self.ckpt_root)
            if removed:
                log.info(
                    f"removed {len(removed)} unfinished checkpoint temp dir(s) a crashed writer left behind"
                )

    # --- when ------------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """This rank's view: every `interval` steps, or `every_minutes` after the last save."""
        by_steps = self.cfg.interval > 0 and step % self.cfg.interval == 0
        minutes = self.cfg.every_minutes
        by_time = minutes > 0 and self.clock() - self._last_save >= 60 * minutes
        return by_steps or by_time

    def maybe_save(self, step: int, snapshot_fn: Callable[[], Snapshot]) -> bool:
        """Save if any rank finds a save due at this step (every rank must call this at every step)."""
        if not self.agree(self.due(step)):
            return False
        self.save(snapshot_fn)
        return True

    # --- how ---------------------------------------------------------------------------------------------

    def save(self, snapshot_fn: Callable[[], Snapshot], *, wait: bool = False) -> None:
        """Snapshot now; commit in the background (or before returning with wait=True)."""
        if not self.writer and self.collective:
            snapshot_fn()  # this rank's part of gathering the state
        if self.writer:
            t0 = time.perf_counter()
            self._join()  # one local write at a time: the disk, not a queue, bounds the backlog
            snap = snapshot_fn()
            self.newest_step = max(snap.step, self.newest_step or 0)
            # The thread alone holds the snapshot, until its write returns: a Stager (staging.py) reuses the
            # snapshot's host buffers only once it is gone, so after the join above they are free again.
            self._writer.start(self._write, snap)
            self.blocked_s.append(time.perf_counter() - t0)
            if wait:
                self._join()
        self._last_save = self.clock()
        self.barrier()

    def _write(self, snap: Snapshot) -> None:
        t0 = time.perf_counter()
        path = checkpoint.write(snap, self.ckpt_root)
        self._committed(path)
        protect = {path} | self._uploading()
        checkpoint.prune(self.ckpt_root, self.cfg.keep_last, keep_best=self.cfg.keep_best, protect=protect)
        blocked = self.blocked_s[-1] if self.blocked_s else 0.0
        log.info(
            f"checkpoint step {snap.step} committed locally in {time.perf_counter() - t0:.2f} s "
            f"(training blocked {blocked:.2f} s)"
        )
        if self.uploader is not None:
            self.uploader.submit(path)

    def _committed(self, path: Path) -> None:
        """Keep the newest: after an emergency an older background write can still finish."""
        if self.last_committed is None or _step_of(path) >= _step_of(self.last_committed):
            self.last_committed = path

    def _uploading(self) -> set[Path]:
        if self.uploader is None:
            return set()
        return {checkpoint.step_dir(self.ckpt_root, s) for s in self.uploader.in_flight_steps()}

    def _join(self) -> None:
        self._writer.join()

    def emergency(self, snapshot_fn: Callable[[], Snapshot], seconds_left: Callable[[], float]) -> Emergency:
        """Save a checkpoint now and get it as far as the deadline allows: the bucket, or at least this disk.

        With a bucket, older uploads are cancelled (the new checkpoint replaces them), then the local commit
        and the upload run side by side; what has not uploaded EXIT_MARGIN_S before the deadline is aborted.
        """
        t0 = time.monotonic()
        self._preempting = True
        if not self.writer or self.uploader is None:
            self.save(snapshot_fn, wait=True)
            if not self.writer:  # the writer (rank 0) saves; this rank only took part in the decision
                self._emergency = Emergency(None, None, None, False, "", {})
                return self._emergency
            path = self.last_committed
            message = f"committed locally at {path}" if path is not None else ""
            timings = {"total_s": time.monotonic() - t0}
            self._emergency = Emergency(self.newest_step, path, None, False, message, timings)
            return self._emergency
        end = t0 + max(0.0, seconds_left() - EXIT_MARGIN_S)
        self._cancel = threading.Event()
        self.uploader.abandon("a preemption came; the emergency checkpoint replaces it", outcome=SKIPPED)
        # No join: an older write may still hold its snapshot, whose buffers the Stager then leaves alone.
        snap = snapshot_fn()
        step, remote = snap.step, self.uploader.remote
        self.newest_step = max(step, self.newest_step or 0)
        timings = {"snapshot_s": time.monotonic() - t0}
        cancel, staged, final = self._cancel, None, checkpoint.step_dir(self.ckpt_root, step)
        local: Worker | None = None
        failed: checkpoint.CheckpointError | None = None
        if not isinstance(snap, Snapshot):  # sharded: the shards are on disk; commit them, then upload those
            try:
                self._committed(checkpoint.write(snap, self.ckpt_root))
            except checkpoint.CheckpointError as e:
                log.error(f"emergency checkpoint step {step}: the local commit failed: {e}")
                failed = e
        if final.is_dir() and checkpoint.verify(final) is None:  # already committed here: send those bytes
            upload = Worker(
                lambda: remote.upload_checkpoint(final, cancel=cancel), "greenrun-emergency-upload"
            )
            self._upload_worker = upload
        elif failed is not None:  # nothing committed to send: the result says why
            upload = Worker(lambda: _raise(failed), "greenrun-emergency-upload")
            self._upload_worker = upload
        else:
            staged = Staged(snap, self.ckpt_root)
            del snap  # rendering drops it: from then on the mapped files are all there is
            upload = Worker(
                lambda: remote.upload_staged(
                    step,
                    checkpoint.FILES,
                    lambda name: staged.data(name, cancel),
                    lambda: staged.manifest(cancel),
                    cancel,
                ),
                "greenrun-emergency-upload",
            )
            self._upload_worker = upload
            try:
                staged.render()  # here: each file goes up as soon as it is written
                local = Worker(staged.seal, "greenrun-emergency-commit")
            except Exception as e:  # no local checkpoint (a full disk?): the upload cannot commit either
                log.error(f"emergency checkpoint step {step}: rendering failed: {type(e).__name__}: {e}")
            timings["render_s"] = time.monotonic() - t0 - timings["snapshot_s"]
        hard = max(end, time.monotonic()) + CLEANUP_S  # cleanup and the local commit's last chance
        if not upload.join_until(end):
            cancel.set()  # the deadline: abort the multipart uploads, delete what was sent
            upload.join_until(hard)
        if local is not None:
            local.join_until(hard)
            if local.value is not None:
                self._committed(local.value)
            elif local.error is not None:
                log.error(f"emergency checkpoint step {step}: the local commit failed: {local.error}")
        path = None if failed is not None else final if staged is None else (local.value if local else None)
        result = self._upload_result(step, upload, time.monotonic() - t0, cancel.is_set(), end - t0)
        self.uploader.record(result)
        timings["upload_s" if result.committed else "upload_abandoned_s"] = upload.seconds or 0.0
        if local is not None and local.seconds is not None:
            timings["local_commit_s"] = local.seconds
        timings["total_s"] = time.monotonic() - t0
        self._emergency = Emergency(step, path, result, True, self._say(step, path, result), timings)
        if staged is not None and (local is None or local.seconds is not None):
            staged.close()  # the commit is done (or failed): its temp dir is no longer needed
        self.barrier()
        return self._emergency

    def abort_emergency(self, why: str) -> None:
        """A second signal or the watchdog: cancel every upload now and give them CLEANUP_S to abort their
        multipart uploads (the process exits right after, and an open upload would stay billed)."""
        log.warning(f"{why}: abandoning the checkpoint uploads")
        self._cancel.set()
        if self.uploader is not None:
            self.uploader.abandon(why)
        if self._upload_worker is not None:
            self._upload_worker.join_until(time.monotonic() + CLEANUP_S)

    @staticmethod
    def _upload_result(
        step: int, upload: Worker, seconds: float, cancelled: bool, budget: float
    ) -> UploadResult:
        if upload.seconds is not None and upload.error is None:
            return upload.value
        if upload.seconds is None or cancelled:
            why = f"abandoned at the deadline ({budget:.1f} s of upload time); its multipart uploads were aborted"
        else:
            why = f"upload failed: {upload.error}"
        return UploadResult(step, 0, seconds, False, why, FAILED)

    def _say(self, step: int, path: Path | None, result: UploadResult) -> str:
        if result.committed:
            if path is None:
                return f"emergency checkpoint step {step} uploaded ({result.note}); the local commit did not finish"
            return f"emergency checkpoint committed locally at {path} and uploaded: {result.note}"
        newest = self.remote_report(wait=False)
        where = (
            "none"
            if newest is None or newest["newest_committed_step"] is None
            else (f"step {newest['newest_committed_step']} ({newest['newest_committed_url']})")
        )
        head = "committed locally only at " + str(path) if path is not None else "NOT committed anywhere"
        return (
            f"emergency checkpoint step {step} {head}; it is not committed remotely: {result.note}. "
            f"The newest checkpoint safe in the bucket: {where}"
        )

    @property
    def preempted(self) -> bool:
        """An emergency save began: what is left of the deadline belongs to the exit."""
        return self._preempting

    @property
    def upload_stop(self) -> str | None:
        """Why the run should end because its checkpoints no longer reach the bucket: set once
        storage.max_failed_uploads uploads failed in a row with storage.on_failed_uploads=stop, cleared by
        the next committed upload. None while healthy, without a bucket, and on every rank but the writer
        (under torchrun, agree on it across ranks before acting, as for any stop)."""
        return None if self.uploader is None else self.uploader.stop_reason

    def remote_report(self, wait: bool = True) -> dict[str, Any] | None:
        """Uploader.report() for the newest checkpoint this process took; None without a bucket.

        wait: first let the uploads in flight finish (not after an emergency: those were abandoned)."""
        if self.uploader is None:
            return None
        if wait and not self._preempting:
            self.uploader.wait()
        return self.uploader.report(self.newest_step)

    def close(self, upload_timeout: float | None = None) -> None:
        if self._preempting:  # the deadline is spent: an older write or upload still running is left alone
            if self.uploader is not None:
                self.uploader.close(timeout=0)
            return
        self._join()
        if self.uploader is not None:
            if not self.uploader.wait(timeout=upload_timeout):
                log.warning("checkpoint uploads did not finish in time; the local checkpoints are complete")
            self.uploader.close(timeout=5.0 if upload_timeout is None else upload_timeout)
            if self.writer:  # a checkpoint still uploading at the last save was spared then: keep_last now
                checkpoint.prune(
                    self.ckpt_root,
                    self.cfg.keep_last,
                    keep_best=self.cfg.keep_best,
                    protect=self._uploading(),
                )


def _step_of(path: Path) -> int:
    return int(checkpoint.STEP_DIR.match(path.name)[1])


def _raise(error: BaseException) -> None:
    raise error
