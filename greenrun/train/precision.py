"""Mixed precision: the autocast context and loss scaler each precision needs, and what a device supports."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from greenrun.core import checks
from greenrun.train import fp8
from greenrun.train.fp8 import Fp8Config

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")


@dataclass
class PrecisionConfig:
    name: str = "fp32"  # fp32 | fp16 (loss scaling) | bf16 | fp8 (wide linears, GPU)
    fp8: Fp8Config = field(default_factory=Fp8Config)  # which linears go to float8 with precision=fp8
    tf32: bool = True  # let fp32 matmuls use TF32 tensor cores on GPU; false for bit-exact fp32


def autocast_dtype(name: str) -> torch.dtype | None:
    # fp8 converts only the wide linears; everything else runs in bf16 autocast.
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}.get(name)


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass; a no-op for fp32."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def scaler(name: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16's 5-bit exponent underflows small gradients, so only fp16 scales the loss; others get a disabled scaler."""
    return torch.amp.GradScaler(device.type, enabled=(name == "fp16"))


def device_problems(name: str, device: torch.device) -> list[str]:
    """What makes `name` impossible on `device`, in words a user can act on."""
    if name not in PRECISIONS:
        return checks.choice("precision.name", name, PRECISIONS)
    if name == "fp8":
        return fp8.device_problems(device)
    if device.type != "cuda":
        return []  # CPU autocast handles fp16 and bf16 (slowly); fine for smoke tests
    major, minor = torch.cuda.get_device_capability(device)
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        return [
            f"precision=bf16: this GPU (compute capability {major}.{minor}) has no bf16 support; "
            "use precision=fp16 (with loss scaling) or precision=fp32"
        ]
    return []


def configure_matmul(cfg: PrecisionConfig) -> None:
    """TF32 keeps fp32's range with a 10-bit mantissa: ~8x faster fp32 matmuls on tensor cores."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
