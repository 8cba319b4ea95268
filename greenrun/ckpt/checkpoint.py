"""Checkpoints that commit: write everything, hash it, write the manifest last, then rename into place.

A checkpoint is the directory `checkpoints/step-<N>/` holding
  model.safetensors   model weights (tied tensors stored once)
  optimizer.pt        optimizer state (tensors and numbers only: loads with weights_only=True)
  trainer.pt          step, loss scaler, RNG states, best validation loss
  manifest.json       step, config hash, versions, and every file's size and sha256 - written last
A directory without a manifest, or whose files do not match it, is not a checkpoint: loading skips it for the
previous good one and says so. Nothing here ever unpickles code.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import greenrun
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


def write(snapshot: Snapshot, ckpt_root: Path) -> Path:
    """Write, verify and commit one checkpoint; returns its directory. Never touches older checkpoints.

    A failed write (a full disk above all) leaves nothing behind and raises CheckpointError in words: torch
    reports a full disk as `[enforce fail at inline_container.cc] ... file write failed`, safetensors as
    `SafetensorError: ... os error 28`.
    """
    try:
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
        manifest = {
            "format": FORMAT,
            "step": snapshot.step,
            "created": time.time(),
            "greenrun": greenrun.__version__,
            "torch": torch.__version__,
            "aliases": snapshot.aliases,
            **snapshot.meta,
            "files": {
                name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                for name in FILES
            },
        }
        for name in FILES:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            if verify(final) is None:
                # Same step already committed (a resumed run redid it): the committed one stands.
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            final.rename(ckpt_root / f".corrupt-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    if set(files) != set(FILES):
        return f"{path.name}: manifest lists {sorted(files)}, expected {list(FILES)}"
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
    model_state = load_file(str(path / "model.safetensors"), device=str(map_location))
    for alias, target in manifest.get("aliases", {}).items():
        model_state[alias] = model_state[target]
    try:
        optim_state = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that would run code
        raise CheckpointError(f"{path.name}: refused to load ({str(e).splitlines()[0]})") from None
    return model_state, optim_state, trainer_state, manifest


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
