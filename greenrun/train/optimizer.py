"""Optimizer construction: AdamW with weight decay on matrices only, fused on CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from greenrun.core import checks

OPTIMIZERS = ("adamw",)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw
    lr: float = 6.0e-4  # peak learning rate after warmup
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.95  # second-moment decay
    eps: float = 1.0e-8  # denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay, applied to 2-D weights only
    fused: bool | None = None  # fused CUDA kernel; None = on when the parameters live on CUDA


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never biases or LayerNorm gains."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    fused = on_cuda if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )


def validate(cfg: OptimizerConfig) -> list[str]:
    problems = checks.choice("optimizer.name", cfg.name, OPTIMIZERS)
    if cfg.lr <= 0:
        problems.append(f"optimizer.lr: must be > 0, got {cfg.lr}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            problems.append(f"optimizer.{key}: must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.weight_decay < 0:
        problems.append(f"optimizer.weight_decay: must be >= 0, got {cfg.weight_decay}")
    return problems
