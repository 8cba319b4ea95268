"""Precisions: each option is one object that knows its autocast, loss scaler, model changes and device needs.

The trainer, the memory model and the smoke test ask the option (`get(cfg.name)`) instead of branching on
its name, so a new precision is one `Precision` registered here and one conf/precision/<name>.yaml.
Reads top to bottom: the config, the option class and its variants, the options themselves, then the
module-level checks the config validation calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from greenrun.core.fields import maths
from greenrun.core.registry import Registry
from greenrun.train import fp8
from greenrun.train.fp8 import Fp8Config


@dataclass
class PrecisionConfig:
    name: str = maths("fp32")  # fp32 | fp16 (loss scaling) | bf16 | fp8 (wide linears, GPU)
    fp8: Fp8Config = field(default_factory=Fp8Config)  # which linears go to float8 with precision=fp8
    tf32: bool = maths(True)  # let fp32 matmuls use TF32 tensor cores on GPU; false for bit-exact fp32


class Precision:
    """One precision option: plain autocast in `autocast_dtype` (None: no autocast), nothing else special.

    Subclasses override only what differs: a device check (bf16), a model conversion (fp8).
    """

    def __init__(
        self,
        name: str,
        autocast_dtype: torch.dtype | None,
        act_bytes: int,
        *,
        loss_scaling: bool = False,
        cpu_stand_in: str | None = None,
    ) -> None:
        self.name = name
        self.autocast_dtype = autocast_dtype
        self.act_bytes = act_bytes  # bytes per activation element, for greenrun.train.memory
        self.loss_scaling = loss_scaling
        self.cpu_stand_in = cpu_stand_in or name  # what `greenrun smoke` runs instead on the CPU

    def __repr__(self) -> str:
        return f"Precision({self.name!r})"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast for the forward pass; a no-op without an autocast dtype."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A loss scaler, enabled only where small gradients would underflow (fp16's 5-bit exponent)."""
        return torch.amp.GradScaler(device.type, enabled=self.loss_scaling)

    def prepare(self, model: nn.Module, cfg: PrecisionConfig) -> list[str]:
        """Change the bare model (before compile and DDP); return the names of the converted layers."""
        return []

    def must_compile(self, prepared: list[str]) -> bool:
        """Whether the model must run compiled after prepare() converted `prepared`."""
        return False

    def device_problems(self, device: torch.device) -> list[str]:
        """What stops this precision on `device`, in words a user can act on; [] if nothing does."""
        return []

    def validate(self, cfg: PrecisionConfig) -> list[str]:
        """Problems with the settings this precision reads; [] when usable."""
        return []


class _NeedsBf16(Precision):
    """bf16 autocast: pre-Ampere GPUs have no bf16 arithmetic. CPU autocast handles it (slowly)."""

    def device_problems(self, device: torch.device) -> list[str]:
        if device.type != "cuda" or torch.cuda.is_bf16_supported():
            return []
        major, minor = torch.cuda.get_device_capability(device)
        return [
            f"precision={self.name}: this GPU (compute capability {major}.{minor}) has no bf16 support; "
            "use precision=fp16 (with loss scaling) or precision=fp32"
        ]


class _Float8(Precision):
    """torchao float8 for the wide linears (see greenrun.train.fp8); everything else in bf16 autocast."""

    def prepare(self, model: nn.Module, cfg: PrecisionConfig) -> list[str]:
        return fp8.apply(cfg.fp8, model)

    def must_compile(self, prepared: list[str]) -> bool:
        # The scale-and-cast kernels only pay off fused into the matmuls; eager fp8 is slower than bf16.
        return bool(prepared)

    def device_problems(self, device: torch.device) -> list[str]:
        return fp8.device_problems(device)

    def validate(self, cfg: PrecisionConfig) -> list[str]:
        return fp8.validate(cfg.fp8)


PRECISIONS: Registry[Precision] = Registry("precision.name")


def _register(option: Precision) -> Precision:
    return PRECISIONS.add(option.name, option)


_register(Precision("fp32", None, act_bytes=4))
_register(Precision("fp16", torch.float16, act_bytes=2, loss_scaling=True))
_register(_NeedsBf16("bf16", torch.bfloat16, act_bytes=2))
# The float8 kernels need an Ada/Hopper GPU; on the CPU the same graph runs in bf16 (fp8 swaps only matmuls).
_register(_Float8("fp8", torch.bfloat16, act_bytes=2, cpu_stand_in="bf16"))


def get(name: str) -> Precision:
    """The option called `name`; KeyError naming the closest valid ones otherwise."""
    return PRECISIONS.get(name)


def validate(cfg: PrecisionConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    return PRECISIONS.problems(cfg.name) or get(cfg.name).validate(cfg)


def device_problems(cfg: PrecisionConfig, device: torch.device) -> list[str]:
    """What makes the configured precision impossible on `device`; [] for an unknown name (validate says it)."""
    if cfg.name not in PRECISIONS:
        return []
    return get(cfg.name).device_problems(device)


def configure_matmul(cfg: PrecisionConfig) -> None:
    """TF32 keeps fp32's range with a 10-bit mantissa: ~8x faster fp32 matmuls on tensor cores."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
