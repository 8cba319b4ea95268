"""The read-back half of a run's mirror: list, verify and fetch checkpoints, the token cache, archive.

`Remote` (greenrun.ckpt.remote) adds the writing half; this module holds what a reader on a fresh machine
needs and the key layout both halves share (see remote.py for the layout).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from greenrun.ckpt import checkpoint, retention
from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.data import index as data_index
from greenrun.storage import ObjectNotFound, Storage, StorageError, check_key

log = logging.getLogger("greenrun.ckpt.remote")

# step-N/manifest.json, or step-N/<attempt>/<file>; a sharded checkpoint's shards are <attempt>/shards/<file>.
STEP_KEY = re.compile(r"step-(\d{8})/(?:(manifest\.json)|([^/]+)/(?:shards/)?[^/]+)")
REMOTE_ONLY = ("attempt", "run_id", "keys")  # manifest fields the local format does not have
KEY16 = re.compile(r"[0-9a-f]{16}")
# Classes a plain GET can still read: GLACIER and DEEP_ARCHIVE would need a restore before fetch() works.
ARCHIVE_CLASSES = ("STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR")


@dataclass
class StepKeys:
    committed: bool = False
    attempts: dict[str, list[str]] = field(default_factory=dict)  # attempt id -> its file keys


def safe_key(key: str) -> bool:
    """True for a key check_key accepts: a bucket can hold keys with '..' segments that we must not use."""
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def digests(manifest: dict) -> dict[str, str]:
    return {name: entry.get("sha256") for name, entry in manifest.get("files", {}).items()}


def best(manifests: dict[int, dict], n: int) -> list[int]:
    return retention.best({step: m.get("val_loss") for step, m in manifests.items()}, n)


class RemoteReader:
    """One run's checkpoints in a Storage, read back: what a fresh machine needs to resume."""

    def __init__(self, storage: Storage, run_key: str) -> None:
        self.storage = storage
        self.run_key = check_key(run_key.strip("/"))
        self.run_id = self.run_key.rsplit("/", 1)[-1]

    def _step_prefix(self, step: int) -> str:
        return f"{self.run_key}/checkpoints/step-{step:08d}/"

    def manifest_key(self, step: int) -> str:
        return self._step_prefix(step) + "manifest.json"

    def download_data_cache(self, key16: str, cache_dir: Path) -> Path:
        """`cache_dir/key16`, downloaded if missing: built in a temp dir, meta.json last, then renamed.

        Lets a fresh machine (another Python, so another stdlib corpus) train on exactly the same tokens.
        """
        if not KEY16.fullmatch(key16):
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
                if name != "meta.json" and "/" not in name and safe_key(prefix + name):
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

    def _scan(self) -> dict[int, StepKeys]:
        base, found = f"{self.run_key}/checkpoints/", {}
        for key in self.storage.list(base):
            match = STEP_KEY.fullmatch(key[len(base) :])
            # Keys check_key refuses (a planted 'step-00000001/../x') are not ours to touch, or to delete.
            if match and safe_key(key):
                entry = found.setdefault(int(match[1]), StepKeys())
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
        if here and digests(checkpoint.read_manifest(final)) == digests(manifest):
            return final  # already here, byte for byte: nothing to download
        keys, where = manifest.get("keys", {}), f"remote step-{step:08d}"
        # The file names become local paths and come from the bucket: only the checkpoint's own names pass,
        # and a bad key is a broken checkpoint (fall back to the previous one), not a crash.
        if (
            not isinstance(keys, dict)
            or set(keys) != set(manifest.get("files", {}))
            or checkpoint.names_problem(manifest) is not None
            or not all(
                isinstance(k, str) and k.startswith(self._step_prefix(step)) and safe_key(k)
                for k in keys.values()
            )
        ):
            raise CheckpointError(f"{where}: manifest keys do not match its files")
        dst_root.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.temp_dir(dst_root, final.name)
        tmp.mkdir()  # a crash leaves it to checkpoint.clean_stale()
        try:
            for name, key in keys.items():
                (tmp / name).parent.mkdir(exist_ok=True)  # shards/ of a sharded checkpoint
                try:
                    self.storage.get(key, tmp / name)
                except ObjectNotFound:
                    raise CheckpointError(f"{where}/{name}: missing at {self.storage.url(key)}") from None
            local = {k: v for k, v in manifest.items() if k not in REMOTE_ONLY}
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
        hot = {*committed[:1], *best(manifests, 1)}
        moved = []
        for step, manifest in sorted(manifests.items()):
            if step in hot or manifest.get("created", math.inf) > cutoff:
                continue
            keys = [k for k in manifest.get("keys", {}).values() if isinstance(k, str) and safe_key(k)]
            changed = [self.storage.set_storage_class(key, storage_class) for key in keys]
            if any(changed):
                moved.append(step)
        return moved


def _cache_problem(tmp: Path, meta_bytes: bytes) -> str | None:
    """Why the downloaded token cache in tmp does not match its meta.json, or None."""
    try:
        meta = json.loads(meta_bytes)
    except ValueError:
        return "meta.json is malformed"
    return data_index.problem(tmp, meta, check_sha256=True)
