"""The emergency save: one checkpoint written locally and uploaded at the same time, within a deadline.

A preemption leaves seconds. The snapshot's three files are rendered once into the checkpoint's temp directory
(into the page cache, with the very calls checkpoint.write makes, so the bytes are the same) and mapped into
memory. Two threads then race the deadline side by side:

  local   sha256 of each file -> fsync -> manifest.json -> rename: checkpoint.write's commit, step for step
  remote  each file goes up at once under this process's attempt (multipart, parts in parallel); as soon as
          the local thread has the sizes and sha256s, the manifest follows with If-None-Match: the remote commit

At the deadline the upload is cancelled: its multipart uploads are aborted and the files it sent are deleted.
Both threads are daemons, so nothing they do can hold the process past its exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import greenrun
from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import FILES, FORMAT, Snapshot
from greenrun.ckpt.remote import UploadResult
from greenrun.core.fs import fsync_dir
from greenrun.runtime.spot import EXIT_ABORTED, EXIT_LOCAL_ONLY, EXIT_PREEMPTED, PROVIDERS, SpotConfig
from greenrun.storage import Storage, StorageConfig
from greenrun.storage import build as storage_build
from greenrun.storage.base import UploadCancelled

_POLL_S = 0.05
# Of the deadline, kept for what follows the save: summary.json, closing, and the interpreter's own exit
# (a second or more with torch loaded on a busy 2-core machine).
EXIT_MARGIN_S = 2.5
CLEANUP_S = 0.5  # of that margin: a cancelled upload aborting its multipart uploads and deleting its files


class Staged:
    """A checkpoint rendered into its temp directory and mapped read-only; `seal()` commits it locally.

    `render()` writes the files one after the other and announces each as soon as it is written, so the
    upload of model.safetensors starts while optimizer.pt is still being rendered (`data(name)` waits).
    """

    def __init__(self, snap: Snapshot, ckpt_root: Path) -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        self.step, self.root = snap.step, ckpt_root
        self.final = checkpoint.step_dir(ckpt_root, snap.step)
        self.tmp = checkpoint.temp_dir(ckpt_root, self.final.name)  # what checkpoint.write names it
        self.tmp.mkdir()
        self.files: dict[str, memoryview] = {}
        self._snap: Snapshot | None = snap
        self._maps: list[mmap.mmap] = []
        self._rendered = {name: threading.Event() for name in FILES}
        self._render_error: BaseException | None = None
        self._ready = threading.Event()
        self._manifest: dict | None = None
        self._error: BaseException | None = None
        self._head = {"aliases": snap.aliases, **snap.meta}

    def render(self) -> None:
        """Write the files with checkpoint.write's calls (into the page cache: no fsync yet) and map them."""
        snap, self._snap = self._snap, None  # the snapshot's memory goes once it is rendered
        assert snap is not None, "render() runs once"
        writers = {
            "model.safetensors": lambda p: save_file(snap.model, str(p), metadata={"format": str(FORMAT)}),
            "optimizer.pt": lambda p: torch.save(snap.optimizer, p),
            "trainer.pt": lambda p: torch.save(snap.trainer, p),
        }
        try:
            for name in FILES:
                writers[name](self.tmp / name)
                self.files[name] = self._map(self.tmp / name)
                self._rendered[name].set()
        except BaseException as e:
            self._render_error = e
            raise
        finally:
            for event in self._rendered.values():  # nobody waits for a file that will never come
                event.set()

    def data(self, name: str, cancel: threading.Event | None = None) -> memoryview:
        """The mapped bytes of `name`, once rendered; raises if rendering failed or on cancel."""
        while not self._rendered[name].wait(_POLL_S):
            if cancel is not None and cancel.is_set():
                raise UploadCancelled(f"step {self.step}: cancelled while {name} was being rendered")
        if name not in self.files:
            raise RuntimeError(f"step {self.step}: rendering {name} failed: {self._render_error}")
        return self.files[name]

    def _map(self, path: Path) -> memoryview:
        with open(path, "rb") as f:  # the mapping outlives the descriptor, and the rename of the directory
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(mapped)
        return memoryview(mapped)

    def seal(self) -> Path:
        """The local commit: hashes (published at once for the upload), fsync, manifest, rename."""
        try:
            files = {
                name: {"size": view.nbytes, "sha256": hashlib.sha256(view).hexdigest()}
                for name, view in self.files.items()
            }
            # The fields and their order of checkpoint.write's manifest: the same checkpoint either way.
            self._manifest = {
                "format": FORMAT,
                "step": self.step,
                "created": time.time(),
                "greenrun": greenrun.__version__,
                "torch": torch.__version__,
                **self._head,
                "files": files,
            }
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._ready.set()
        for name in FILES:
            with open(self.tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        with open(self.tmp / "manifest.json", "w") as f:
            json.dump(self._manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp)
        if self.final.exists():
            if checkpoint.verify(self.final) is None:
                shutil.rmtree(self.tmp, ignore_errors=True)  # the committed one stands, as in write()
                return self.final
            self.final.rename(self.root / f".corrupt-{self.final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(self.tmp, self.final)
        fsync_dir(self.root)
        return self.final

    def manifest(self, cancel: threading.Event | None = None) -> dict:
        """The manifest seal() computes, once it has; raises what seal() raised, or on cancel."""
        while not self._ready.wait(_POLL_S):
            if cancel is not None and cancel.is_set():
                raise UploadCancelled(f"step {self.step}: cancelled while the local commit hashed its files")
        if self._manifest is None:
            raise RuntimeError(f"step {self.step}: the local commit failed: {self._error}")
        return self._manifest

    def close(self) -> None:
        """Drop the mappings (a thread still sending keeps its own until it ends) and any temp dir left."""
        self.files = {}
        for mapped in self._maps:
            with contextlib.suppress(BufferError):  # exported: an upload thread still holds a slice
                mapped.close()
        self._maps.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Worker:
    """A daemon thread that keeps its function's value or exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # read by the waiting thread
            self.error = e
        finally:
            self.seconds = time.monotonic() - self._t0

    def join_until(self, end: float) -> bool:
        """Wait until the monotonic time `end`; True when the thread has finished."""
        self._thread.join(max(0.0, end - time.monotonic()))
        return not self._thread.is_alive()


@dataclass
class Emergency:
    """What an emergency save achieved; `message` says it in words, `exit_code` for the process."""

    step: int | None
    local: Path | None  # the committed local checkpoint, if the local commit finished
    remote: UploadResult | None  # the upload's result; None without a bucket (storage=local)
    has_bucket: bool
    message: str
    timings: dict[str, float]

    @property
    def where(self) -> str:
        """'bucket' | 'local' | 'none': the safest place the checkpoint reached ('' on a non-writer rank)."""
        if self.step is None:
            return ""
        if self.remote is not None and self.remote.committed:
            return "bucket"
        return "local" if self.local is not None else "none"

    @property
    def safe(self) -> bool:
        """Committed in the run's storage: the bucket, or run.dir when there is no bucket."""
        return self.exit_code == EXIT_PREEMPTED

    @property
    def exit_code(self) -> int:
        """75: safe in the run's storage (the bucket; run.dir with storage=local). 77: only on this disk.
        76: no emergency checkpoint at all; resume from the previous one."""
        where = self.where
        if where in ("", "bucket") or (where == "local" and not self.has_bucket):
            return EXIT_PREEMPTED
        return EXIT_LOCAL_ONLY if where == "local" else EXIT_ABORTED


# --- before the run: does an emergency checkpoint of this model fit the deadline? ----------------------

# What the emergency save costs besides sending the bytes (snapshot, rendering, hashing, and the slower sending
# while those share the CPU), per byte: calibrated on the 2-core machine of docs/benchmarks.md, where GPT-2
# 124M's 1.48 GB took 18-22 s from snapshot to manifest against a probe speed of ~127 MB/s.
RENDER_BYTES_PER_S = 0.2e9
PROBE_MAX_BYTES = 64 * 1024 * 1024


def estimate_line(storage_cfg: StorageConfig, spot_cfg: SpotConfig, params: int, local_root: Path) -> str:
    """One line for the smoke report: an emergency checkpoint's size and, with a bucket, whether its upload
    fits the deadline at the upload speed measured now (a few parallel parts sent to the bucket, then deleted).

    The size assumes fp32 weights and two fp32 AdamW moments per parameter (12 bytes per parameter).
    """
    nbytes = 12 * params
    head = f"  emergency checkpoint: ~{nbytes / 1e9:.2f} GB"
    if storage_cfg.kind != "s3":
        return f"{head}, committed in run.dir (storage={storage_cfg.kind}: nothing to upload)"
    try:
        speed, where = _measure_upload(storage_build(storage_cfg, local_root), storage_cfg)
    except Exception as e:  # a report line, never a failed smoke test
        return f"{head}; could not measure the upload speed ({type(e).__name__}: {e})"
    needed = nbytes / RENDER_BYTES_PER_S + nbytes / speed
    windows = [(spot_cfg.deadline_s, "SIGTERM deadline (spot.deadline_s)")]
    window = PROVIDERS.get(spot_cfg.provider).window_s
    if window is not None and window > spot_cfg.deadline_s:
        windows.append((window, f"{spot_cfg.provider} notice window"))
    verdicts = []
    for seconds, name in windows:
        fits = needed <= seconds - EXIT_MARGIN_S
        verdicts.append(f"{'fits' if fits else 'does NOT fit'} the {seconds:g} s {name}")
    line = (
        f"{head}; upload measured at {speed / 1e6:.0f} MB/s to {where} -> ~{needed:.0f} s to reach the "
        f"bucket: {', '.join(verdicts)}"
    )
    if needed > spot_cfg.deadline_s - EXIT_MARGIN_S:
        line += (
            "; a SIGTERM would leave it on this disk only (exit 77): raise spot.deadline_s if the platform "
            "allows, use the provider's notice (spot=aws: 120 s), save more often, or upload faster "
            "(storage.max_concurrency)"
        )
    return line


def _measure_upload(storage: Storage, cfg: StorageConfig) -> tuple[float, str]:
    """Bytes per second of one multipart upload in parallel parts, as the emergency upload sends them."""
    part = cfg.part_size_mb * 1024 * 1024
    size = min(PROBE_MAX_BYTES, max(2, cfg.max_concurrency) * part)
    data = os.urandom(size)
    key = f".greenrun-probe/{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    try:
        storage.put_bytes(key, data)
        seconds = time.perf_counter() - t0
    finally:
        with contextlib.suppress(Exception):
            storage.delete(key)
    return size / max(seconds, 1e-6), f"{storage.url(key).rsplit('/', 2)[0]}/ ({size >> 20} MiB probe)"
