"""What the hardware can do: datasheet peaks for model-FLOPs utilisation (MFU, dense bf16 tensor-core FLOP/s),
the CPU threads a run should use, and matmul rates measured on this CPU."""

from __future__ import annotations

import os
import time

import torch

# Matched against torch.cuda.get_device_name(); first match wins, so longer names come first.
DENSE_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def peak_bf16_flops(device: torch.device) -> float:
    """Peak dense bf16 FLOP/s of `device`, or 0.0 when unknown (CPU, unlisted GPU): MFU is then not reported."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_FLOPS if key in name), 0.0)


def cpu_threads(requested: int, local_processes: int = 1) -> int:
    """Intra-op threads for a CPU run: `requested`, else OMP_NUM_THREADS, else this process's share of the
    cores it may run on (torchrun's workers on one machine split them rather than fight over them)."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def matmul_rates(dtype: torch.dtype, size: int = 256, seconds: float = 0.05) -> tuple[float, float]:
    """(fp32, `dtype` under autocast) matmul GFLOP/s on this CPU, measured now in about 2 x `seconds`."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def rate(autocast: bool) -> float:
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            (a @ b).sum()  # warm-up: kernels and caches
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                a @ b
                n += 1
        return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9

    return rate(False), rate(True)
