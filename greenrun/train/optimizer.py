"""Optimizers: each option builds itself and says how much state it keeps, so memory estimates ask it.

A new optimizer is one class registered in OPTIMIZERS here and one conf/optimizer/<name>.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from greenrun.core.fields import maths
from greenrun.core.registry import Registry


@dataclass
class OptimizerConfig:
    name: str = maths("adamw")  # adamw
    lr: float = maths(2.0e-3)  # peak learning rate after warmup
    beta1: float = maths(0.9)  # first-moment decay
    beta2: float = maths(0.95)  # second-moment decay
    eps: float = maths(1.0e-8)  # denominator epsilon
    weight_decay: float = maths(0.1)  # decoupled weight decay, applied to 2-D weights only
    fused: bool | None = maths(None)  # fused CUDA kernel; None = on when the parameters live on CUDA


class OptimizerOption(Protocol):
    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over `model`'s parameters."""
        ...

    def state_bytes(self, n_params: int) -> int:
        """Bytes of optimizer state kept for `n_params` fp32 parameters."""
        ...


OPTIMIZERS: Registry[OptimizerOption] = Registry("optimizer.name")


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


class AdamW:
    """AdamW with weight decay on matrices only; the fused kernel on CUDA unless told otherwise."""

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        on_cuda = next(model.parameters()).is_cuda
        return torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=on_cuda if cfg.fused is None else cfg.fused,
        )

    def state_bytes(self, n_params: int) -> int:
        return 8 * n_params  # two fp32 moments per parameter


OPTIMIZERS.add("adamw", AdamW())


def build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over `model`; KeyError naming the closest options for an unknown name."""
    return OPTIMIZERS.get(cfg.name).build(cfg, model)


def validate(cfg: OptimizerConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = OPTIMIZERS.problems(str(cfg.name))
    if cfg.lr <= 0:
        problems.append(f"optimizer.lr: must be > 0, got {cfg.lr}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            problems.append(f"optimizer.{key}: must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.weight_decay < 0:
        problems.append(f"optimizer.weight_decay: must be >= 0, got {cfg.weight_decay}")
    return problems
