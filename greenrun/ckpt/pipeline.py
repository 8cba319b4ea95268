"""The save pipeline, and the one place that decides when to save.

snapshot (the only part training waits for) -> local commit -> remote upload. Training blocks only while the
state is copied off the device; a background thread writes and commits the local checkpoint, prunes old ones,
and hands the committed directory to the uploader (another thread). The emergency path (preemption) does the
same but waits, within the deadline, for the local commit and then the upload.

Every rank holds a Checkpointer so that all of them take the same decision at the same step (`agree` is an
all-reduce under torchrun); only the writer (rank 0) snapshots and writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig, Snapshot
from greenrun.ckpt.uploader import Uploader

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
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.ckpt_root, self.uploader = cfg, Path(ckpt_root), uploader
        self.writer, self.agree, self.barrier, self.clock = writer, agree, barrier, clock
        self.blocked_s: list[float] = []  # seconds the training loop waited, per save
        self.last_committed: Path | None = None
        self._last_save = clock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
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
        if self.writer:
            t0 = time.perf_counter()
            self._join()  # one local write at a time: the disk, not a queue, bounds the backlog
            snap = snapshot_fn()
            self._thread = threading.Thread(
                target=self._write, args=(snap,), name="greenrun-ckpt", daemon=True
            )
            self._thread.start()
            self.blocked_s.append(time.perf_counter() - t0)
            if wait:
                self._join()
        self._last_save = self.clock()
        self.barrier()

    def _write(self, snap: Snapshot) -> None:
        try:
            t0 = time.perf_counter()
            path = checkpoint.write(snap, self.ckpt_root)
            self.last_committed = path
            protect = {path} | self._uploading()
            checkpoint.prune(
                self.ckpt_root, self.cfg.keep_last, keep_best=self.cfg.keep_best, protect=protect
            )
            blocked = self.blocked_s[-1] if self.blocked_s else 0.0
            log.info(
                f"checkpoint step {snap.step} committed locally in {time.perf_counter() - t0:.2f} s "
                f"(training blocked {blocked:.2f} s)"
            )
            if self.uploader is not None:
                self.uploader.submit(path)
        except BaseException as e:  # surfaced on the training thread at the next save or close
            self._error = e

    def _uploading(self) -> set[Path]:
        if self.uploader is None:
            return set()
        return {checkpoint.step_dir(self.ckpt_root, s) for s in self.uploader.in_flight_steps()}

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def emergency(self, snapshot_fn: Callable[[], Snapshot], seconds_left: Callable[[], float]) -> str:
        """Commit locally, then upload what fits before the deadline. Returns what was achieved, in words."""
        self.save(snapshot_fn, wait=True)
        if not self.writer:
            return ""
        where = f"committed locally at {self.last_committed}"
        if self.uploader is None:
            return where
        # Keep a margin for process exit; an upload that does not finish stays uncommitted remotely (no manifest).
        budget = max(0.0, seconds_left() - 2.0)
        if self.uploader.wait(timeout=budget):
            return where + " and uploaded"
        return (
            where
            + f"; upload still running when the deadline came ({budget:.0f} s) — it is not committed remotely"
        )

    def close(self, upload_timeout: float | None = None) -> None:
        self._join()
        if self.uploader is not None:
            if not self.uploader.wait(timeout=upload_timeout):
                log.warning("checkpoint uploads did not finish in time; the local checkpoints are complete")
            self.uploader.close(timeout=5.0 if upload_timeout is None else upload_timeout)
