"""Model-only exports: the weights alone, in a chosen dtype, for inference or fine-tuning.

A resume never reads them (checkpoints hold the full state); `checkpoint.keep_exports` bounds how many stay.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from greenrun.ckpt.staging import unique_tensors
from greenrun.core import fs
from greenrun.core.background import OneAtATime

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_path(run_dir: Path, step: int, dtype: str) -> Path:
    """Where the export of `step` lives: step-major names, so sorting them sorts by step."""
    return Path(run_dir) / "export" / f"model-step-{step:08d}-{dtype}.safetensors"


def write(run_dir: Path, model_state: dict[str, torch.Tensor], step: int, dtype: str, keep: int) -> Path:
    """Write `model_state` (tied tensors once) as `dtype` safetensors; keep the newest `keep` (>= 1) exports."""
    path = write_file(export_path(run_dir, step, dtype), model_state, step, dtype)
    _prune(path.parent, keep)
    return path


def _prune(folder: Path, keep: int) -> None:
    for old in sorted(folder.glob("model-step-*.safetensors"), reverse=True)[max(1, keep) :]:
        old.unlink(missing_ok=True)


def write_file(path: Path, model_state: dict[str, torch.Tensor], step: int, dtype: str) -> Path:
    """One export file at `path`: `model_state` (tied tensors once) as `dtype` safetensors, written atomically."""
    return _write_host(path, host_copy(model_state, dtype), step, dtype)


def host_copy(model_state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The weights (tied tensors once) as `dtype` CPU tensors: a copy the training loop can no longer change."""
    unique, _ = unique_tensors(model_state)
    return {
        k: v.detach().to("cpu", DTYPES[dtype], copy=True) if v.is_floating_point() else v.cpu().clone()
        for k, v in unique.items()
    }


def _write_host(path: Path, weights: dict[str, torch.Tensor], step: int, dtype: str) -> Path:
    fs.refuse_symlink(path.parent)  # a linked export/ would put (and overwrite) files elsewhere
    fs.atomic_write(path, save(weights, metadata={"step": str(step), "dtype": dtype}))
    return path


class BackgroundExports:
    """Exports written off the training loop: the host copy is taken now, the file written by a thread.

    Early stopping's restore_best exports at every new best; written inline, each one stalled a GPT-2 124M
    run on an H200 by about a second (serialising and fsyncing 250 MB). One write is in flight at most: a
    new export waits for the previous one, so export/ never holds a newer file with an older one half-written.
    """

    def __init__(self) -> None:
        self._job = OneAtATime("greenrun-export")

    def submit(
        self, run_dir: Path, model_state: dict[str, torch.Tensor], step: int, dtype: str, keep: int
    ) -> Path:
        self.wait()
        weights = host_copy(model_state, dtype)
        path = export_path(run_dir, step, dtype)

        def work() -> None:
            _write_host(path, weights, step, dtype)
            _prune(path.parent, keep)

        self._job.start(work)
        return path

    def wait(self) -> None:
        """Block until the export in flight is on disk; raise what it raised."""
        self._job.join()
