"""Learning-rate schedules: pure functions of the step, so resume needs no scheduler state."""

from __future__ import annotations

import math
from dataclasses import dataclass

from greenrun.core import checks

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear | constant (each after linear warmup)
    warmup_steps: int = 50  # steps of linear warmup from 0 to optimizer.lr
    min_lr_ratio: float = 0.1  # final lr as a fraction of optimizer.lr (cosine, linear)


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        # (step + 1) so the very first update already moves the weights.
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak_lr
    floor = peak_lr * cfg.min_lr_ratio
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.name == "linear":
        return peak_lr - (peak_lr - floor) * progress
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


def validate(cfg: ScheduleConfig) -> list[str]:
    problems = checks.choice("schedule.name", cfg.name, SCHEDULES)
    if cfg.warmup_steps < 0:
        problems.append(f"schedule.warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        problems.append(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    return problems
