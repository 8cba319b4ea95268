"""Mirror committed local checkpoints to a Storage (a bucket or a directory) and get them back.

Layout under the run key R:
  R/config.yaml                                    the resolved config, uploaded once at start
  R/data/<key16>/...                               the token cache; its meta.json goes up last
  R/checkpoints/step-<N:08d>/<attempt>/<file>      the files of one upload attempt
  R/checkpoints/step-<N:08d>/manifest.json         written last with if_none_match: the commit
  R/LATEST                                         {"step", "attempt"}: a hint only
Each process writes under its own attempt id, so a zombie writer from an older attempt can never
overwrite files a newer commit points at; the conditional manifest write picks exactly one winner per step.
Readers list manifests and take the newest whose files verify against the sha256 in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from greenrun.ckpt import checkpoint, retention
from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.ckpt.retention import Retention
from greenrun.storage import (
    CommitConflict,
    ObjectNotFound,
    Storage,
    StorageError,
    check_key,
    parse_s3_url,
)

log = logging.getLogger(__name__)

_STEP_KEY = re.compile(r"step-(\d{8})/(?:(manifest\.json)|([^/]+)/[^/]+)")
_REMOTE_ONLY = ("attempt", "run_id", "keys")  # manifest fields the local format does not have
_KEY16 = re.compile(r"[0-9a-f]{16}")
# Classes a plain GET can still read: GLACIER and DEEP_ARCHIVE would need a restore before fetch() works.
ARCHIVE_CLASSES = ("STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR")


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


@dataclass
class _StepKeys:
    committed: bool = False
    attempts: dict[str, list[str]] = field(default_factory=dict)  # attempt id -> its file keys


def _safe_key(key: str) -> bool:
    """True for a key check_key accepts: a bucket can hold keys with '..' segments that we must not use."""
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def _digests(manifest: dict) -> dict[str, str]:
    return {name: entry.get("sha256") for name, entry in manifest.get("files", {}).items()}


def _best(manifests: dict[int, dict], n: int) -> list[int]:
    return retention.best({step: m.get("val_loss") for step, m in manifests.items()}, n)


class Remote:
    """One run's mirror in a Storage; `attempt` tells this process's uploads apart from any other's."""

    def __init__(self, storage: Storage, run_key: str, attempt: str | None = None) -> None:
        self.storage = storage
        self.run_key = check_key(run_key.strip("/"))
        self.run_id = self.run_key.rsplit("/", 1)[-1]
        # Unique per process lifetime; sorts by start time and reads well in a bucket listing.
        started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.attempt = check_key(attempt or f"a-{started}-{secrets.token_hex(4)}")
        self.last_committed: int | None = None  # newest step this process committed (or found identical)

    def _step_prefix(self, step: int) -> str:
        return f"{self.run_key}/checkpoints/step-{step:08d}/"

    def manifest_key(self, step: int) -> str:
        return self._step_prefix(step) + "manifest.json"

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            self.storage.delete(key)

    # --- run files and the token cache ---------------------------------------------------------------

    def put_run_file(self, name: str, path: Path) -> None:
        self.storage.put(f"{self.run_key}/{name}", Path(path))

    def upload_data_cache(self, cache_path: Path) -> bool:
        """Upload a complete token cache unless the run already has it; meta.json goes last as its marker."""
        cache_path = Path(cache_path)
        if not _KEY16.fullmatch(cache_path.name) or not (cache_path / "meta.json").is_file():
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

    def download_data_cache(self, key16: str, cache_dir: Path) -> Path:
        """`cache_dir/key16`, downloaded if missing: built in a temp dir, meta.json last, then renamed.

        Lets a fresh machine (another Python, so another stdlib corpus) train on exactly the same tokens.
        """
        if not _KEY16.fullmatch(key16):
            raise ValueError(f"{key16!r} is not a 16-hex-digit token cache key")
        cache_dir = Path(os.path.expanduser(cache_dir))
        final, prefix = cache_dir / key16, f"{self.run_key}/data/{key16}/"
        if (final / "meta.json").is_file():
            return final
        names = [key[len(prefix) :] for key in self.storage.list(prefix)]
        if "meta.json" not in names:
            raise ObjectNotFound(f"no complete token cache at {self.storage.url(prefix + 'meta.json')}")
        meta_bytes = self.storage.get_bytes(prefix + "meta.json")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".download-{key16}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name in names:
                # Names check_key refuses (e.g. '..') are skipped, not fatal: the cache is then incomplete.
                if name != "meta.json" and "/" not in name and _safe_key(prefix + name):
                    self.storage.get(prefix + name, tmp / name)
            problem = _cache_problem(tmp, meta_bytes)
            if problem:
                raise StorageError(f"token cache at {self.storage.url(prefix + 'meta.json')}: {problem}")
            with open(tmp / "meta.json", "wb") as f:  # last: its presence marks the cache complete
                f.write(meta_bytes)
                f.flush()
                os.fsync(f.fileno())
            if (final / "meta.json").is_file():
                return final  # another process (a torchrun rank) published it meanwhile
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover without meta.json
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    # --- checkpoints: upload --------------------------------------------------------------------------

    def upload_checkpoint(self, local_dir: Path) -> UploadResult:
        """Upload one committed local checkpoint under this attempt, then commit it with the manifest."""
        t0, local_dir = time.monotonic(), Path(local_dir)
        problem = checkpoint.verify(local_dir)
        if problem is not None:
            raise CheckpointError(f"not uploading {local_dir}: {problem}")
        manifest = checkpoint.read_manifest(local_dir)
        step = int(manifest["step"])

        def result(committed: bool, note: str, nbytes: int = 0) -> UploadResult:
            return UploadResult(step, nbytes, time.monotonic() - t0, committed, note)

        if self.storage.exists(self.manifest_key(step)):  # a resumed process redoing a step: send nothing
            return self._record(result(*self._settle(step, manifest)))
        attempt_prefix = f"{self._step_prefix(step)}{self.attempt}/"
        keys = {name: attempt_prefix + name for name in manifest["files"]}
        remote = {**manifest, "attempt": self.attempt, "run_id": self.run_id, "keys": keys}
        nbytes, sent = sum(entry["size"] for entry in manifest["files"].values()), []
        try:
            for name, key in keys.items():
                self.storage.put(key, local_dir / name)
                sent.append(key)
            body = json.dumps(remote, indent=1).encode()
            self.storage.put_bytes(self.manifest_key(step), body, if_none_match=True)
        except CommitConflict:
            self._delete(sent)  # the winner's manifest never points at this attempt's files
            return self._record(result(*self._settle(step, manifest), nbytes))
        except BaseException:
            # Shards without a manifest attempt are garbage; after a failed manifest write they are not:
            # it may have landed anyway. prune() removes whatever stays behind.
            if len(sent) < len(keys):
                with contextlib.suppress(Exception):
                    self._delete(sent)
            raise
        finally:
            # A lost answer to CreateMultipartUpload makes the retry open a second upload and the first
            # stays open, billed. This prefix is this attempt's alone, so nobody else is writing there.
            with contextlib.suppress(Exception):
                self.storage.abort_stale_uploads(attempt_prefix)
        self._point_latest(step)
        return self._record(
            result(True, f"step {step} committed at {self.storage.url(self.manifest_key(step))}", nbytes)
        )

    def _record(self, outcome: UploadResult) -> UploadResult:
        if outcome.committed and (self.last_committed is None or outcome.step > self.last_committed):
            self.last_committed = outcome.step
        return outcome

    def _settle(self, step: int, manifest: dict) -> tuple[bool, str]:
        """(committed, note) when the step already has a manifest: identical files count as committed."""
        try:
            theirs = self._manifest(step)
        except CheckpointError as e:
            theirs = {"attempt": f"? ({e})"}
        who = f"step {step} is already committed by attempt {theirs.get('attempt')}"
        if _digests(theirs) == _digests(manifest):
            return True, f"{who} with identical files"
        note = f"conflict: {who} with other files; left it in place, dropped attempt {self.attempt}"
        log.warning("%s: %s", self.storage.url(self.manifest_key(step)), note)
        return False, note

    def _point_latest(self, step: int) -> None:
        key = f"{self.run_key}/LATEST"
        try:
            # LATEST is foreign data: a "step" that is no number must not fail an upload that has committed.
            with contextlib.suppress(ObjectNotFound, ValueError, AttributeError, TypeError):
                if json.loads(self.storage.get_bytes(key)).get("step", -1) > step:
                    return  # never move the hint backwards (a resumed process redoing an old step)
            self.storage.put_bytes(key, json.dumps({"step": step, "attempt": self.attempt}).encode())
        except StorageError as e:  # only a hint: the manifest already committed the step
            log.warning("could not update %s: %s", self.storage.url(key), e)

    # --- checkpoints: read back -----------------------------------------------------------------------

    def _scan(self) -> dict[int, _StepKeys]:
        base, found = f"{self.run_key}/checkpoints/", {}
        for key in self.storage.list(base):
            match = _STEP_KEY.fullmatch(key[len(base) :])
            # Keys check_key refuses (a planted 'step-00000001/../x') are not ours to touch, or to delete.
            if match and _safe_key(key):
                entry = found.setdefault(int(match[1]), _StepKeys())
                if match[2]:
                    entry.committed = True
                else:
                    entry.attempts.setdefault(match[3], []).append(key)
        return found

    def steps(self) -> list[int]:
        """Committed steps (those with a manifest), newest first; not yet verified."""
        return sorted((step for step, keys in self._scan().items() if keys.committed), reverse=True)

    def _manifest(self, step: int) -> dict:
        where = self.storage.url(self.manifest_key(step))
        try:
            manifest = json.loads(self.storage.get_bytes(self.manifest_key(step)))
        except ObjectNotFound:
            raise CheckpointError(f"{where}: missing") from None
        except ValueError:
            raise CheckpointError(f"{where}: not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != checkpoint.FORMAT:
            raise CheckpointError(f"{where}: unknown manifest format")
        return manifest

    def _manifests(self, steps: list[int]) -> dict[int, dict]:
        """Readable manifests of steps; an unreadable one counts as empty (no val_loss, no attempt)."""
        found = {}
        for step in steps:
            try:
                found[step] = self._manifest(step)
            except CheckpointError:
                found[step] = {}
        return found

    def fetch(self, step: int, dst_root: Path) -> Path:
        """Download step into dst_root/step-N through a temp dir, verified like a local checkpoint."""
        manifest, dst_root = self._manifest(step), Path(dst_root)
        final = checkpoint.step_dir(dst_root, step)
        here = final.is_dir() and checkpoint.verify(final) is None
        if here and _digests(checkpoint.read_manifest(final)) == _digests(manifest):
            return final  # already here, byte for byte: nothing to download
        keys, where = manifest.get("keys", {}), f"remote step-{step:08d}"
        # The file names become local paths and come from the bucket: only the checkpoint's own names pass,
        # and a bad key is a broken checkpoint (fall back to the previous one), not a crash.
        if (
            not isinstance(keys, dict)
            or set(keys) != set(manifest.get("files", {}))
            or set(keys) != set(checkpoint.FILES)
            or not all(
                isinstance(k, str) and k.startswith(self._step_prefix(step)) and _safe_key(k)
                for k in keys.values()
            )
        ):
            raise CheckpointError(f"{where}: manifest keys do not match its files")
        dst_root.mkdir(parents=True, exist_ok=True)
        tmp = dst_root / f"{checkpoint.TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # a crash leaves it to checkpoint.clean_stale()
        try:
            for name, key in keys.items():
                try:
                    self.storage.get(key, tmp / name)
                except ObjectNotFound:
                    raise CheckpointError(f"{where}/{name}: missing at {self.storage.url(key)}") from None
            local = {k: v for k, v in manifest.items() if k not in _REMOTE_ONLY}
            (tmp / "manifest.json").write_text(json.dumps(local, indent=1))
            problem = checkpoint.verify(tmp)
            if problem is not None:
                raise CheckpointError(problem.replace(tmp.name, where))
            if final.exists():  # a different or broken local copy: set aside, never silently deleted
                final.rename(dst_root / f".replaced-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def fetch_latest_valid(self, dst_root: Path, warn: Callable[[str], None] = print) -> Path | None:
        """The newest remote checkpoint that downloads and verifies; each skipped one goes through warn.

        Only a missing object or a hash mismatch falls back; other storage errors (no network) raise.
        """
        for step in self.steps():
            try:
                return self.fetch(step, dst_root)
            except CheckpointError as e:
                warn(f"skipping remote checkpoint: {e}; falling back to the previous one")
        return None

    # --- housekeeping ---------------------------------------------------------------------------------

    def prune(
        self, keep_last: int, keep_best: int = 0, protect: set[int] | frozenset[int] = frozenset()
    ) -> list[int]:
        """Apply the run's Retention to the bucket; returns the steps deleted.

        Kept: what Retention keeps (the newest keep_last, the keep_best lowest val_loss, protect). Also
        removes attempts no manifest points at, but only below the newest commit: above it (and at it) a
        writer may still be uploading.
        """
        scan = self._scan()
        committed = sorted((s for s, keys in scan.items() if keys.committed), reverse=True)
        if not committed:
            return []
        # "Newest" counts manifests nobody verified, and a newer broken or foreign one must not push this
        # run's good checkpoints out: what this process committed itself, from a verified copy, stays.
        if self.last_committed is not None:
            protect = {*protect, self.last_committed}
        newest, manifests = committed[0], self._manifests(committed)
        val_loss = {step: m.get("val_loss") for step, m in manifests.items()}
        keep = Retention(keep_last, keep_best).keep(committed, val_loss, protect)
        deleted = []
        for step, keys in sorted(scan.items()):
            if step >= newest or step in protect:
                continue
            if keys.committed and step not in keep:
                self.storage.delete(self.manifest_key(step))  # uncommit first: a crash leaves only orphans
                self._delete([k for ks in keys.attempts.values() for k in ks])
                deleted.append(step)
            elif not keys.committed or "attempt" in manifests[step]:
                live = manifests.get(step, {}).get("attempt")
                self._delete([k for a, ks in keys.attempts.items() if a != live for k in ks])
        return deleted

    def archive(
        self, older_than_days: float, storage_class: str = "GLACIER_IR", now: float | None = None
    ) -> list[int]:
        """Move checkpoints older than older_than_days to a colder storage class; returns the steps moved.

        The newest and the best (lowest val_loss) stay hot, and so do manifests: listing and prune read
        them often, and cold classes bill small objects as 128 KiB. Idempotent.
        """
        if storage_class not in ARCHIVE_CLASSES:
            raise ValueError(f"storage_class={storage_class!r}: fetch() can read only {ARCHIVE_CLASSES}")
        if storage_class not in self.storage.storage_classes():
            where = type(self.storage).__name__
            log.info("archive: %s has no storage class %s; nothing to do", where, storage_class)
            return []
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        committed = self.steps()
        manifests = self._manifests(committed)
        hot = {*committed[:1], *_best(manifests, 1)}
        moved = []
        for step, manifest in sorted(manifests.items()):
            if step in hot or manifest.get("created", math.inf) > cutoff:
                continue
            keys = [k for k in manifest.get("keys", {}).values() if isinstance(k, str) and _safe_key(k)]
            changed = [self.storage.set_storage_class(key, storage_class) for key in keys]
            if any(changed):
                moved.append(step)
        return moved


def _cache_problem(tmp: Path, meta_bytes: bytes) -> str | None:
    """Why the downloaded token cache in tmp does not match its meta.json, or None."""
    if not (tmp / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    try:
        meta = json.loads(meta_bytes)
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = {
            f"{split}-{i:05d}.bin": n * itemsize
            for split, ns in meta["shards"].items()
            for i, n in enumerate(ns)
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return "meta.json is malformed"
    for name, size in shards.items():
        if not (tmp / name).is_file() or (tmp / name).stat().st_size != size:
            return f"{name} is missing or not {size} bytes"
    return None
