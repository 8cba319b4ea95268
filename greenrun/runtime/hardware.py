"""Datasheet peaks for model-FLOPs utilisation (MFU): dense (no sparsity) bf16 tensor-core FLOP/s."""

from __future__ import annotations

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
