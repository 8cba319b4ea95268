"""Model-only exports: the weights alone, in a chosen dtype, for inference or fine-tuning.

A resume never reads them (checkpoints hold the full state); `checkpoint.keep_exports` bounds how many stay.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from greenrun.ckpt.staging import unique_tensors
from greenrun.core import fs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_path(run_dir: Path, step: int, dtype: str) -> Path:
    """Where the export of `step` lives: step-major names, so sorting them sorts by step."""
    return Path(run_dir) / "export" / f"model-step-{step:08d}-{dtype}.safetensors"


def write(run_dir: Path, model_state: dict[str, torch.Tensor], step: int, dtype: str, keep: int) -> Path:
    """Write `model_state` (tied tensors once) as `dtype` safetensors; keep the newest `keep` (>= 1) exports."""
    unique, _ = unique_tensors(model_state)
    weights = {
        k: v.detach().to("cpu", DTYPES[dtype]) if v.is_floating_point() else v.cpu()
        for k, v in unique.items()
    }
    path = export_path(run_dir, step, dtype)
    fs.refuse_symlink(path.parent)  # a linked export/ would put (and overwrite) files elsewhere
    fs.atomic_write(path, save(weights, metadata={"step": str(step), "dtype": dtype}))
    for old in sorted(path.parent.glob("model-step-*.safetensors"), reverse=True)[max(1, keep) :]:
        old.unlink(missing_ok=True)
    return path
