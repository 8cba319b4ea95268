"""Learning-rate schedules: pure functions of the step, so resume needs no scheduler state.

Every schedule shares the linear warmup in `lr_at`; after it, the registered decay for `schedule.name`
maps progress through the rest of the run (0 -> 1) to a learning rate. A new schedule is one decay
function registered in SCHEDULES here and one conf/schedule/<name>.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from greenrun.core.fields import maths
from greenrun.core.registry import Registry


@dataclass
class ScheduleConfig:
    name: str = maths("cosine")  # cosine | linear | constant (each after linear warmup)
    warmup_steps: int = maths(40)  # steps of linear warmup from 0 to optimizer.lr
    min_lr_ratio: float = maths(0.1)  # final lr as a fraction of optimizer.lr (cosine, linear)


# (progress in [0, 1], peak lr, floor lr) -> lr
Decay = Callable[[float, float, float], float]
SCHEDULES: Registry[Decay] = Registry("schedule.name")


@SCHEDULES.register("cosine")
def cosine(progress: float, peak: float, floor: float) -> float:
    """Half a cosine from peak to floor: slow at both ends, fastest in the middle."""
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("linear")
def linear(progress: float, peak: float, floor: float) -> float:
    """A straight line from peak to floor."""
    return peak - (peak - floor) * progress


@SCHEDULES.register("constant")
def constant(progress: float, peak: float, floor: float) -> float:
    """The peak for the whole run; min_lr_ratio is ignored."""
    return peak


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    decay = SCHEDULES.get(cfg.name)  # first, so an unknown name fails at step 0, not after warmup
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        # (step + 1) so the very first update already moves the weights.
        return peak_lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return decay(progress, peak_lr, peak_lr * cfg.min_lr_ratio)


def validate(cfg: ScheduleConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = SCHEDULES.problems(str(cfg.name))
    if cfg.warmup_steps < 0:
        problems.append(f"schedule.warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        problems.append(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    return problems
