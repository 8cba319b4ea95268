"""Checkpoints that commit: write everything, hash it, write the manifest last, then rename into place.

A checkpoint is the directory `checkpoints/step-<N>/` holding
  model.safetensors   model weights (tied tensors stored once)
  optimizer.pt        optimizer state (tensors and numbers only: loads with weights_only=True)
  trainer.pt          step, loss scaler, RNG states, best validation loss
  manifest.json       step, config hash, versions, and every file's size and sha256 - written last
A directory without a manifest, or whose files do not match it, is not a checkpoint: loading skips it for the
previous good one and says so. Nothing here ever unpickles code.

`distributed.checkpoint=sharded` (fsdp) writes another layout, committed the same way: shards/*.safetensors from
every rank, optimizer_meta.pt and trainer.pt, and a manifest with "layout": "sharded" listing all of them
(ckpt/sharded.py). `verify` checks every listed file; `load` reads either layout into full CPU tensors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import greenrun
from greenrun.ckpt import sharded
from greenrun.ckpt.retention import Retention

# Taking the snapshot (copying the state off the device) lives in staging.py; these names stay importable here.
from greenrun.ckpt.staging import Snapshot as Snapshot
from greenrun.ckpt.staging import Stager as Stager
from greenrun.ckpt.staging import to_cpu as to_cpu
from greenrun.ckpt.staging import unique_tensors as unique_tensors
from greenrun.core import lock
from greenrun.core.fields import plain
from greenrun.core.fs import fsync_dir

log = logging.getLogger(__name__)

FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"
# .tmp-step-00000010-1a2b3c4d-4242@host: the writer's pid and host, so cleanup can tell a live writer's dir.
_OWNED_TMP = re.compile(r"^\.tmp-.*-(\d+)@([A-Za-z0-9._-]+)$")
FILES = ("model.safetensors", "optimizer.pt", "trainer.pt")


@dataclass
class CheckpointConfig:
    interval: int = plain(200)  # steps between checkpoints (0 = only at the end and on stop/preemption)
    keep_last: int = plain(2)  # newest committed checkpoints kept, locally and in the bucket (>= 1)
    keep_best: int = plain(0)  # also keep this many checkpoints with the lowest validation loss
    every_minutes: float = plain(
        0.0
    )  # also checkpoint after this many minutes of wall clock (0 = off; spot: 15-30)
    weights_dtype: str = plain("bf16")  # dtype of the model-only weight export at the end: bf16 | fp16 | fp32
    keep_exports: int = plain(1)  # model-only exports kept in RUN_DIR/export/, newest first (>= 1)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that fails verification."""


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:08d}"


def temp_dir(ckpt_root: Path, final_name: str) -> Path:
    """A fresh temp directory name for writing `final_name`, tagged with this writer's pid@host."""
    return ckpt_root / f"{TMP_PREFIX}{final_name}-{uuid.uuid4().hex[:8]}-{lock.owner_tag()}"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- write and commit ---------------------------------------------------------------------------------


LOW_SPACE_BYTES = 64 << 20  # a write that fails with less than this free failed for want of space


@dataclass
class Pending:
    """Rank 0's part of a sharded save: the shards are on disk in `tmp`; commit() finishes the checkpoint."""

    step: int
    tmp: Path
    optim_meta: dict
    trainer: dict
    meta: dict

    def commit(self, ckpt_root: Path) -> Path:
        try:
            torch.save(self.optim_meta, self.tmp / sharded.OPTIM_META)
            torch.save(self.trainer, self.tmp / "trainer.pt")
            names = sorted(p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file())
            extra = {"aliases": {}, **self.meta, "layout": sharded.LAYOUT}
            return commit(self.tmp, step_dir(ckpt_root, self.step), self.step, extra, names)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)


def write(snapshot: Snapshot | Pending, ckpt_root: Path) -> Path:
    """Write, verify and commit one checkpoint; returns its directory. Never touches older checkpoints.

    A failed write (a full disk above all) leaves nothing behind and raises CheckpointError in words: torch
    reports a full disk as `[enforce fail at inline_container.cc] ... file write failed`, safetensors as
    `SafetensorError: ... os error 28`.
    """
    try:
        if not isinstance(snapshot, Snapshot):  # a sharded save: its shards are written, rank 0 commits
            return snapshot.commit(ckpt_root)
        return _write(snapshot, ckpt_root)
    # OSError, torch's RuntimeError, safetensors' SafetensorError: each is how its writer says "I/O failed".
    except Exception as e:
        free = _free_bytes(ckpt_root)
        full = getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e)
        if full or (free is not None and free < LOW_SPACE_BYTES):
            left = "" if free is None else f" ({free / 2**20:.0f} MiB free)"
            raise CheckpointError(
                f"no space left on {ckpt_root}{left} while writing checkpoint step {snapshot.step}; the previous "
                "checkpoints are kept. Free some space or point run.dir at a larger disk, then resume"
            ) from None
        raise CheckpointError(
            f"could not write checkpoint step {snapshot.step} under {ckpt_root}: {e}"
        ) from None


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def _write(snapshot: Snapshot, ckpt_root: Path) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_root, snapshot.step)
    tmp = temp_dir(ckpt_root, final.name)
    tmp.mkdir()
    try:
        save_file(snapshot.model, str(tmp / "model.safetensors"), metadata={"format": str(FORMAT)})
        torch.save(snapshot.optimizer, tmp / "optimizer.pt")
        torch.save(snapshot.trainer, tmp / "trainer.pt")
        return commit(tmp, final, snapshot.step, {"aliases": snapshot.aliases, **snapshot.meta}, FILES)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, final: Path, step: int, extra: dict, names: Iterable[str]) -> Path:
    """Hash and fsync the files `names` (paths relative to tmp), write the manifest last, rename tmp to final.

    Both layouts commit here: the full one (FILES) and the sharded one (ckpt/sharded.py, shards/ included).
    """
    names = list(names)
    manifest = {
        "format": FORMAT,
        "step": step,
        "created": time.time(),
        "greenrun": greenrun.__version__,
        "torch": torch.__version__,
        **extra,
        "files": {
            name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in names
        },
    }
    for name in names:
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    for sub in {(tmp / name).parent for name in names} - {tmp}:
        fsync_dir(sub)
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    ckpt_root = final.parent
    if final.exists():
        if verify(final) is None:
            # Same step already committed (a resumed run redid it): the committed one stands.
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        final.rename(ckpt_root / f".corrupt-{final.name}-{uuid.uuid4().hex[:8]}")
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    return final


# --- verify and load ----------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: no readable manifest.json ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: manifest.json has an unknown format")
    return manifest


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and every file matches its manifest, else the reason."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return f"{path.name}: manifest.json has no file list"
    problem = names_problem(manifest) or (_stray_shards(path, files) if _is_sharded(manifest) else None)
    if problem is not None:
        return f"{path.name}: {problem}"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{path.name}/{name}: missing"
        if f.stat().st_size != entry["size"]:
            return (
                f"{path.name}/{name}: size {f.stat().st_size} != {entry['size']} in the manifest (truncated?)"
            )
        if sha256_file(f) != entry["sha256"]:
            return f"{path.name}/{name}: sha256 does not match the manifest (corrupted)"
    return None


def _is_sharded(manifest: dict) -> bool:
    return manifest.get("layout") == "sharded"


def names_problem(manifest: dict) -> str | None:
    """None if the manifest lists exactly its layout's files, else why not. The names become local paths (and
    may come from a bucket): a sharded checkpoint's are its two fixed files and at least one plain file name
    under shards/, nothing that climbs out of it."""

    files = manifest.get("files", {})
    if not _is_sharded(manifest):
        return None if set(files) == set(FILES) else f"manifest lists {sorted(files)}, expected {list(FILES)}"
    fixed = {sharded.OPTIM_META, "trainer.pt"}
    shards = {n for n in files if re.fullmatch(rf"{sharded.SHARDS}/[A-Za-z0-9._-]+", n) and ".." not in n}
    if set(files) != fixed | shards or not shards:
        return f"manifest lists {sorted(files)}, not a sharded checkpoint's files"
    return None


def _stray_shards(path: Path, files: dict) -> str | None:
    """DCP's reader takes every .safetensors file in shards/, listed or not: an unlisted one is refused."""

    on_disk = {p.relative_to(path).as_posix() for p in (path / sharded.SHARDS).glob("*") if p.is_file()}
    if extra := sorted(on_disk - set(files)):
        return f"{extra} in {sharded.SHARDS}/ but not in the manifest"
    return None


def committed(ckpt_root: Path) -> list[Path]:
    """Step directories that carry a manifest, newest first (not yet verified)."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


def latest_valid(ckpt_root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint whose files all verify; each skipped one is reported through `warn`."""
    for path in committed(ckpt_root):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {problem}; falling back to the previous one")
    return None


def load(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict, dict, dict]:
    """(model state, optimizer state, trainer state, manifest) of a verified checkpoint."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(problem)
    manifest = read_manifest(path)
    if manifest.get("layout") == "sharded":
        model_state, optim_state = sharded.load_full_state(
            path, load_pt(path, sharded.OPTIM_META, "cpu")
        )  # full CPU tensors, no process group
        trainer_state = load_pt(path, "trainer.pt", "cpu")
        return (
            to_device(model_state, map_location),
            to_device(optim_state, map_location),
            trainer_state,
            manifest,
        )
    model_state = load_file(str(path / "model.safetensors"), device=str(map_location))
    for alias, target in manifest.get("aliases", {}).items():
        model_state[alias] = model_state[target]
    optim_state = load_pt(path, "optimizer.pt", map_location)
    trainer_state = load_pt(path, "trainer.pt", "cpu")
    return model_state, optim_state, trainer_state, manifest


def load_pt(path: Path, name: str, map_location: str | torch.device) -> dict:
    try:
        return torch.load(path / name, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses anything that would run code
        raise CheckpointError(f"{path.name}: refused to load ({str(e).splitlines()[0]})") from None


def to_device(obj: object, device: str | torch.device) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# --- housekeeping ----------------------------------------------------------------------------------------


def writer_gone(name: str) -> bool:
    """Whether the writer of temp dir `name` is gone, as far as this machine can tell.

    A name without pid@host comes from an older greenrun (or a fetch): under the run directory's lock no such
    writer is live. A live pid of this host, this process included, is a write in progress. A writer on another
    host cannot be seen from here: its directory is left alone.
    """
    m = _OWNED_TMP.match(name)
    if m is None:
        return True
    pid, host = int(m.group(1)), m.group(2)
    return host == lock.hostname() and pid != os.getpid() and not lock.alive(pid)


def clean_stale(ckpt_root: Path) -> list[Path]:
    """Remove temp directories that crashed writers left behind; they never held a committed checkpoint.

    Only under the run directory's lock (ckpt_root's parent; taken here if this process lacks it): a second
    writer once deleted the live temp dir of the first. If another process holds the lock, nothing is removed.
    """
    if not ckpt_root.is_dir():
        return []
    try:
        held = lock.acquire(ckpt_root.parent)
    except (lock.Busy, OSError) as e:
        log.warning(f"left checkpoint temp dirs under {ckpt_root} alone: {e}")
        return []
    removed, elsewhere = [], []
    with held:
        for p in ckpt_root.iterdir():
            if not p.name.startswith(TMP_PREFIX) or p.is_symlink() or not p.is_dir():
                continue
            if writer_gone(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            else:
                elsewhere.append(p.name)
    if elsewhere:
        log.info(f"left {len(elsewhere)} temp dir(s) of writers still running or on other hosts: {elsewhere}")
    return removed


def prune(
    ckpt_root: Path, keep_last: int, keep_best: int = 0, protect: set[Path] | frozenset[Path] = frozenset()
) -> list[Path]:
    """Apply Retention(keep_last, keep_best) to the committed checkpoints under ckpt_root.

    Never deletes the newest valid checkpoint, nor anything in `protect` (just written, or still uploading).
    """
    dirs = committed(ckpt_root)
    step_of = {path: int(STEP_DIR.match(path.name).group(1)) for path in dirs}
    guard = {step_of[p] for p in protect if p in step_of}
    for path in dirs:  # the newest valid one; a protected path was just verified by its writer
        if path in protect or verify(path) is None:
            guard.add(step_of[path])
            break
    val_loss: dict[int, object] = {}
    if keep_best > 0:
        for path in dirs:
            with contextlib.suppress(CheckpointError):
                val_loss[step_of[path]] = read_manifest(path).get("val_loss")
    keep = Retention(keep_last, keep_best).keep(step_of.values(), val_loss, guard)
    removed = []
    for path in dirs:
        if step_of[path] not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
