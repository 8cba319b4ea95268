"""Mirror committed local checkpoints to a Storage (a bucket or a directory): the writing half.

Layout under the run key R:
  R/config.yaml                                    the resolved config, uploaded once at start
  R/data/<key16>/...                               the token cache; its meta.json goes up last
  R/checkpoints/step-<N:08d>/<attempt>/<file>      the files of one upload attempt
  R/checkpoints/step-<N:08d>/manifest.json         written last with if_none_match: the commit
  R/LATEST                                         {"step", "attempt"}: a hint only
Each process writes under its own attempt id, so a zombie writer from an older attempt can never
overwrite files a newer commit points at; the conditional manifest write picks exactly one winner per step.
Readers list manifests and take the newest whose files verify against the sha256 in it (remote_read.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.ckpt.remote_read import KEY16, RemoteReader, digests
from greenrun.ckpt.retention import Retention
from greenrun.storage import CommitConflict, ObjectNotFound, Storage, StorageError, check_key, parse_s3_url
from greenrun.storage.base import Data, UploadCancelled

log = logging.getLogger(__name__)

# A checkpoint's fate in the bucket, one per checkpoint this process wrote.
COMMITTED = "committed"  # in the bucket with exactly these files (or identical ones another attempt sent)
FAILED = "failed"  # tried and not committed: an error, a conflict, or abandoned at the deadline
SKIPPED = "skipped"  # never tried: a newer checkpoint replaced it in the queue, or the uploader had closed


def parse_run_url(url: str) -> tuple[str, str]:
    """'s3://bucket/greenrun/2026-11-22_10-00-00' -> ('bucket', 'greenrun/2026-11-22_10-00-00')."""
    bucket, run_key = parse_s3_url(url)
    if not run_key:
        raise ValueError(f"{url!r} names a bucket but no run: expected s3://bucket/prefix/run")
    return bucket, check_key(run_key)


@dataclass
class UploadResult:
    step: int
    bytes: int  # payload sent this time (0 when nothing needed sending)
    seconds: float
    committed: bool  # the step is committed remotely with exactly these files
    note: str
    outcome: str = ""  # COMMITTED | FAILED | SKIPPED; "" = from `committed` (COMMITTED or FAILED)

    def __post_init__(self) -> None:
        if not self.outcome:
            self.outcome = COMMITTED if self.committed else FAILED


# name -> function that sends that file to the given key (a local file or bytes in memory).
Senders = dict[str, Callable[[str], None]]


class Remote(RemoteReader):
    """One run's mirror in a Storage; `attempt` tells this process's uploads apart from any other's."""

    def __init__(self, storage: Storage, run_key: str, attempt: str | None = None) -> None:
        super().__init__(storage, run_key)
        # Unique per process lifetime; sorts by start time and reads well in a bucket listing.
        started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.attempt = check_key(attempt or f"a-{started}-{secrets.token_hex(4)}")
        self.last_committed: int | None = None  # newest step this process committed (or found identical)

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            self.storage.delete(key)

    # --- run files and the token cache ---------------------------------------------------------------

    def put_run_file(self, name: str, path: Path) -> None:
        self.storage.put(f"{self.run_key}/{name}", Path(path))

    def upload_data_cache(self, cache_path: Path) -> bool:
        """Upload a complete token cache unless the run already has it; meta.json goes last as its marker."""
        cache_path = Path(cache_path)
        if not KEY16.fullmatch(cache_path.name) or not (cache_path / "meta.json").is_file():
            raise ValueError(f"{cache_path} is not a complete token cache (<cache_dir>/<key16>/meta.json)")
        prefix = f"{self.run_key}/data/{cache_path.name}/"
        if self.storage.exists(prefix + "meta.json"):
            return False
        for path in sorted(cache_path.iterdir()):
            if path.is_file() and path.name != "meta.json" and not path.name.startswith("."):
                self.storage.put(prefix + path.name, path)
        try:
            self.storage.put(prefix + "meta.json", cache_path / "meta.json", if_none_match=True)
        except CommitConflict:
            return False  # another process of this run uploaded the same cache first
        return True

    # --- checkpoints: upload --------------------------------------------------------------------------

    def upload_checkpoint(self, local_dir: Path, cancel: threading.Event | None = None) -> UploadResult:
        """Upload one committed local checkpoint under this attempt, then commit it with the manifest."""
        t0, local_dir = time.monotonic(), Path(local_dir)
        problem = checkpoint.verify(local_dir)
        if problem is not None:
            raise CheckpointError(f"not uploading {local_dir}: {problem}")
        manifest = checkpoint.read_manifest(local_dir)
        nbytes = sum(entry["size"] for entry in manifest["files"].values())

        def sender(name: str) -> Callable[[str], None]:
            return lambda key: self.storage.put(key, local_dir / name, cancel=cancel)

        senders = {name: sender(name) for name in manifest["files"]}
        return self._upload(int(manifest["step"]), senders, lambda: manifest, lambda: nbytes, cancel, t0)

    def upload_staged(
        self,
        step: int,
        names: tuple[str, ...],
        data: Callable[[str], Data],
        manifest: Callable[[], dict],
        cancel: threading.Event | None = None,
    ) -> UploadResult:
        """Upload a checkpoint from memory while it is still being written locally (the emergency path).

        Each file goes up as soon as `data(name)` has it; `manifest()` blocks until the local writer has the
        sizes and sha256 (or raises if it failed), and only then is the manifest written: the same commit
        as upload_checkpoint's.
        """
        t0, sizes = time.monotonic(), {}

        def sender(name: str) -> Callable[[str], None]:
            def send(key: str) -> None:
                view = data(name)
                sizes[name] = memoryview(view).nbytes
                self.storage.put_bytes(key, view, cancel=cancel)

            return send

        senders = {name: sender(name) for name in names}
        return self._upload(step, senders, manifest, lambda: sum(sizes.values()), cancel, t0)

    def _upload(
        self,
        step: int,
        senders: Senders,
        manifest_fn: Callable[[], dict],
        nbytes: Callable[[], int],
        cancel: threading.Event | None,
        t0: float,
    ) -> UploadResult:
        def result(committed: bool, note: str, sent_bytes: int = 0) -> UploadResult:
            return UploadResult(step, sent_bytes, time.monotonic() - t0, committed, note)

        if self.storage.exists(self.manifest_key(step)):  # a resumed process redoing a step: send nothing
            return self._record(result(*self._settle(step, manifest_fn())))
        attempt_prefix = f"{self._step_prefix(step)}{self.attempt}/"
        keys = {name: attempt_prefix + name for name in senders}
        sent: list[str] = []
        manifest_sent = False
        try:
            for name, key in keys.items():
                senders[name](key)
                sent.append(key)
            manifest = manifest_fn()
            if int(manifest["step"]) != step or set(manifest["files"]) != set(keys):
                raise CheckpointError(f"step {step}: the local manifest does not describe these files")
            remote = {**manifest, "attempt": self.attempt, "run_id": self.run_id, "keys": keys}
            body = json.dumps(remote, indent=1).encode()
            if cancel is not None and cancel.is_set():
                raise UploadCancelled(f"upload of step {step} cancelled before its commit")
            manifest_sent = True
            self.storage.put_bytes(self.manifest_key(step), body, if_none_match=True)
        except CommitConflict:
            self._delete(sent)  # the winner's manifest never points at this attempt's files
            return self._record(result(*self._settle(step, manifest_fn()), nbytes()))
        except BaseException:
            # Shards without a manifest attempt are garbage; after a failed manifest write they are not:
            # it may have landed anyway. prune() removes whatever stays behind.
            if not manifest_sent:
                with contextlib.suppress(Exception):
                    self._delete(sent)
            raise
        finally:
            # A lost answer to CreateMultipartUpload makes the retry open a second upload and the first
            # stays open, billed. This prefix is this attempt's alone, so nobody else is writing there.
            with contextlib.suppress(Exception):
                self.storage.abort_stale_uploads(attempt_prefix)
        self._point_latest(step, self.attempt)
        return self._record(
            result(True, f"step {step} committed at {self.storage.url(self.manifest_key(step))}", nbytes())
        )

    def _record(self, outcome: UploadResult) -> UploadResult:
        if outcome.committed and (self.last_committed is None or outcome.step > self.last_committed):
            self.last_committed = outcome.step
        return outcome

    def _settle(self, step: int, manifest: dict) -> tuple[bool, str]:
        """(committed, note) when the step already has a manifest: identical files count as committed.

        A committed step also gets LATEST: a process killed between its manifest and LATEST left the hint
        on an older step, and the resumed process that finds the step committed is the one to fix it.
        """
        try:
            theirs = self._manifest(step)
        except CheckpointError as e:
            theirs = {"attempt": f"? ({e})"}
        who = f"step {step} is already committed by attempt {theirs.get('attempt')}"
        if digests(theirs) == digests(manifest):
            if isinstance(theirs.get("attempt"), str):
                self._point_latest(step, theirs["attempt"])
            return True, f"{who} with identical files"
        note = f"conflict: {who} with other files; left it in place, dropped attempt {self.attempt}"
        log.warning("%s: %s", self.storage.url(self.manifest_key(step)), note)
        return False, note

    def _point_latest(self, step: int, attempt: str) -> None:
        key = f"{self.run_key}/LATEST"
        try:
            # LATEST is foreign data: a "step" that is no number must not fail an upload that has committed.
            with contextlib.suppress(ObjectNotFound, ValueError, AttributeError, TypeError):
                if json.loads(self.storage.get_bytes(key)).get("step", -1) >= step:
                    return  # never move the hint backwards (a resumed process redoing an old step)
            self.storage.put_bytes(key, json.dumps({"step": step, "attempt": attempt}).encode())
        except StorageError as e:  # only a hint: the manifest already committed the step
            log.warning("could not update %s: %s", self.storage.url(key), e)

    # --- housekeeping ---------------------------------------------------------------------------------

    def prune(
        self, keep_last: int, keep_best: int = 0, protect: set[int] | frozenset[int] = frozenset()
    ) -> list[int]:
        """Apply the run's Retention to the bucket; returns the steps deleted.

        Kept: what Retention keeps (the newest keep_last, the keep_best lowest val_loss, protect). Also
        removes attempts no manifest points at: below the newest commit all of them; at the newest commit
        those of this process and of the processes before it (attempt ids sort by start time; a newer one
        may still be racing); above it only this process's own (anyone else may still be uploading there).
        """
        scan = self._scan()
        committed = sorted((s for s, keys in scan.items() if keys.committed), reverse=True)
        if not committed:
            return []
        # "Newest" counts manifests nobody verified, and a newer broken or foreign one must not push this
        # run's good checkpoints out: what this process committed itself, from a verified copy, stays.
        busy = set(protect)  # steps still uploading or pending: their attempts are left alone
        if self.last_committed is not None:
            protect = {*protect, self.last_committed}
        newest, manifests = committed[0], self._manifests(committed)
        val_loss = {step: m.get("val_loss") for step, m in manifests.items()}
        keep = Retention(keep_last, keep_best).keep(committed, val_loss, protect)
        deleted = []
        for step, keys in sorted(scan.items()):
            if step in busy:
                continue
            live = manifests.get(step, {}).get("attempt")
            if step > newest:  # uncommitted: only our own leftovers (an abandoned or cancelled upload)
                self._delete(keys.attempts.get(self.attempt, []))
            elif step == newest:
                if "attempt" in manifests[step]:
                    stale = [a for a in keys.attempts if a != live and a <= self.attempt]
                    self._delete([k for a in stale for k in keys.attempts[a]])
            elif keys.committed and step not in keep:
                self.storage.delete(self.manifest_key(step))  # uncommit first: a crash leaves only orphans
                self._delete([k for ks in keys.attempts.values() for k in ks])
                deleted.append(step)
            elif not keys.committed or "attempt" in manifests[step]:
                self._delete([k for a, ks in keys.attempts.items() if a != live for k in ks])
        return deleted
