"""The device a run will train on, as the smoke test sizes it: `smoke.target` and a table of common GPUs.

`smoke.target` says whose memory the predicted peak (greenrun.train.memory) must fit in:

    auto        the config's own training device (trainer.device). On a machine with a GPU, a GPU config is
                held against that GPU's real memory; a GPU config checked where no GPU is visible (a laptop,
                a CI runner) is held against every GPU of the table below, and the report names the ones it
                fits; a CPU config is held against this machine's available RAM.
    cpu         this machine's available RAM.
    <gpu name>  one GPU of the table, e.g. a100-80gb, h100, t4 (case and `_` vs `-` do not matter).
    <GiB>       a size, e.g. 24 or 0.5: that many GiB.

The memory figures are the capacities the vendors' datasheets give (NVIDIA's product pages and datasheets),
in the GB they print, read as GiB: close to what the devices report, less the few percent the driver keeps
(an A100 80GB reports 80.0 GiB, an H100 79.6, an H200 139.8 where the table says 141, a T4 about 15). The
estimate does not include the CUDA context (~0.5 GiB) either, so a run that fits with a few percent to spare is
tight; on a machine with the GPU, smoke.target=auto reads the real figure instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from greenrun.core.checks import closest
from greenrun.core.fields import plain
from greenrun.runtime.distributed import resolve_device
from greenrun.train import autobatch

GiB = 2**30


@dataclass
class SmokeConfig:
    target: str = plain("auto")  # memory to fit: auto | cpu | GiB (e.g. 24) | a GPU (t4, a100-80gb, h100...)


@dataclass(frozen=True)
class Gpu:
    name: str  # what smoke.target takes, e.g. a100-80gb
    label: str  # the product, as the vendor names it
    memory_gib: float  # datasheet capacity (GB as printed, read as GiB)
    watts: (
        float  # board power (TDP), the SXM figure where it comes as SXM and PCIe: projections' upper estimate
    )

    @property
    def memory(self) -> int:
        return int(self.memory_gib * GiB)


# Smallest first. Capacities and board power from the vendors' datasheets (NVIDIA data center and GeForce/RTX
# product pages).
GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("t4", "NVIDIA T4", 16, 70),
        Gpu("v100-16gb", "NVIDIA V100 16GB", 16, 300),
        Gpu("a10", "NVIDIA A10", 24, 150),
        Gpu("a10g", "NVIDIA A10G", 24, 300),
        Gpu("l4", "NVIDIA L4", 24, 72),
        Gpu("rtx3090", "NVIDIA GeForce RTX 3090", 24, 350),
        Gpu("rtx4090", "NVIDIA GeForce RTX 4090", 24, 450),
        Gpu("v100-32gb", "NVIDIA V100 32GB", 32, 300),
        Gpu("a100-40gb", "NVIDIA A100 40GB", 40, 400),
        Gpu("rtx-a6000", "NVIDIA RTX A6000", 48, 300),
        Gpu("l40s", "NVIDIA L40S", 48, 350),
        Gpu("a100-80gb", "NVIDIA A100 80GB", 80, 400),
        Gpu("h100", "NVIDIA H100 80GB (SXM or PCIe)", 80, 700),
        Gpu("h100-nvl", "NVIDIA H100 NVL", 94, 400),
        Gpu("h200", "NVIDIA H200", 141, 700),
        Gpu("b200", "NVIDIA B200", 180, 1000),
    )
}
WORDS = ("auto", "cpu")


@dataclass(frozen=True)
class Target:
    name: str  # what the report calls it, e.g. "NVIDIA T4 (smoke.target=t4)"
    memory: int | None  # bytes; None: any GPU of the table (a GPU config checked where none is visible)
    gpu: bool  # the run trains on a GPU (so the CPU steps need not run its autocast)
    device: torch.device | None  # this machine's device, to ask precisions about; None: not this machine's

    def fits_on(self, total: int) -> list[Gpu]:
        """The table GPUs that hold `total` bytes (for a target of unknown memory)."""
        return [gpu for gpu in GPUS.values() if total <= gpu.memory]

    def capacity(self) -> int:
        """The memory to fit in: the target's own, or the largest GPU of the table."""
        return self.memory if self.memory is not None else max(gpu.memory for gpu in GPUS.values())


def _key(text: str) -> str:
    return str(text).strip().lower().replace("_", "-").replace(" ", "-")


def _size(text: str) -> float | None:
    """smoke.target as GiB ("24", "0.5", "24GiB"), or None when it is not a size."""
    number = _key(text).removesuffix("gib")
    try:
        value = float(number)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def validate(cfg: SmokeConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    key = _key(cfg.target)
    if key in WORDS or key in GPUS:
        return []
    size = _size(cfg.target)
    if size is not None:
        return [] if size > 0 else [f"smoke.target: a size must be > 0 GiB, got {cfg.target}"]
    family = [name for name in GPUS if name.startswith(key)]  # a100 -> a100-40gb, a100-80gb
    near = ", ".join(family) if len(family) > 1 else closest(key, [*WORDS, *GPUS])
    hint = f" (did you mean {near}?)" if near else ""
    return [
        f"smoke.target: unknown target {cfg.target!r}{hint}; choose auto, cpu, a size in GiB (e.g. 24) or a GPU: "
        + ", ".join(GPUS)
    ]


def ram() -> int:
    """This machine's available memory in bytes (MemAvailable, else the physical total)."""
    available = autobatch.available_ram()
    if available is not None:
        return available
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve(cfg: SmokeConfig, trainer_device: str) -> Target:
    """The target `cfg` names, for a config that trains on `trainer_device` (auto | cpu | cuda)."""
    key = _key(cfg.target)
    on_gpu = resolve_device(trainer_device).type == "cuda"
    if key == "cpu" or (key == "auto" and not on_gpu):
        return Target("this machine's RAM", ram(), gpu=False, device=torch.device("cpu"))
    if key == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
            props = torch.cuda.get_device_properties(device)
            return Target(props.name, props.total_memory, gpu=True, device=device)
        return Target("a GPU (none visible here, so every GPU of the table)", None, gpu=True, device=None)
    if key in GPUS:
        gpu = GPUS[key]
        return Target(f"{gpu.label} (smoke.target={gpu.name})", gpu.memory, gpu=True, device=None)
    size = _size(cfg.target)
    if size is None or size <= 0:
        raise ValueError(validate(cfg)[0])
    here = (
        None if on_gpu else torch.device("cpu")
    )  # a size for a CPU run: precisions still need to run on a CPU
    return Target(f"a {size:g} GiB device (smoke.target={cfg.target})", int(size * GiB), on_gpu, here)
