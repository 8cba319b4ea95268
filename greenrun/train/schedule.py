"""Learning-rate schedules: pure functions of the step, so resume needs no scheduler state.

Every schedule shares the linear warmup in `lr_at`; after it, the function registered in SCHEDULES for
`schedule.name` maps a `Position` (the step, the run's length, peak and floor lr) to a learning rate. A new
schedule is one function registered here and one conf/schedule/<name>.yaml.

Because the curve is a function of trainer.max_steps, extending a run (`greenrun resume RUN
trainer.max_steps=N allow_config_change=true`) changes what the remaining steps get. `extension_note` says
what, in one line that the resume logs:

- cosine, linear, step: the curve is recomputed over the new length, so from the resumed step on the lr is
  the new curve's value there, back up from where the old run had got to (from the floor, if it finished).
- wsd: the decay moves to the end of the new run; the steps in between train at peak lr (the stable phase).
- constant: nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from greenrun.core.fields import maths
from greenrun.core.registry import Registry


@dataclass
class ScheduleConfig:
    name: str = maths("cosine")  # cosine | linear | step | constant | wsd (each after linear warmup)
    warmup_steps: int = maths(40)  # steps of linear warmup from 0 to optimizer.lr
    min_lr_ratio: float = maths(0.1)  # lr floor as a fraction of optimizer.lr (all but constant)
    milestones: tuple[float, ...] = maths((0.5, 0.75))  # step: where lr drops, fractions of trainer.max_steps
    gamma: float = maths(0.3)  # step: lr factor at each milestone, in (0, 1]; never below the floor
    decay_fraction: float = maths(0.2)  # wsd: share of trainer.max_steps spent decaying at the end, [0, 1]
    decay_shape: str = maths("linear")  # wsd: linear | cosine | sqrt (the "1-sqrt" decay)

    def __post_init__(self) -> None:
        # OmegaConf hands lists back: one type either way, so a config built in Python and one loaded from
        # YAML compare equal (a resume diffs them).
        self.milestones = tuple(self.milestones)


# --- decay shapes: the share of (peak - floor) left at t in [0, 1] of a decay ---------------------------

Shape = Callable[[float], float]
SHAPES: Registry[Shape] = Registry("schedule.decay_shape")


@SHAPES.register("linear")
def _linear_shape(t: float) -> float:
    return 1.0 - t


@SHAPES.register("cosine")
def _cosine_shape(t: float) -> float:
    # Half a cosine: slow at both ends, fastest in the middle.
    return 0.5 * (1.0 + math.cos(math.pi * t))


@SHAPES.register("sqrt")
def _sqrt_shape(t: float) -> float:
    # Drops fastest at the start, then flattens towards the floor.
    return 1.0 - math.sqrt(t)


# --- schedules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """One optimizer step after the warmup, as a schedule sees it."""

    step: int  # 0-based optimizer step, >= warmup_steps
    max_steps: int  # optimizer steps in the whole run
    progress: float  # through the steps after warmup: 0 at the first, 1 at max_steps (and past it)
    peak: float  # optimizer.lr, reached at the end of warmup
    floor: float  # peak x min_lr_ratio


Schedule = Callable[[Position, ScheduleConfig], float]
SCHEDULES: Registry[Schedule] = Registry("schedule.name")


def _between(at: Position, left: float) -> float:
    """The lr `left` (a share, 1 -> 0) of the way from the floor up to the peak."""
    return at.floor + (at.peak - at.floor) * left


@SCHEDULES.register("cosine")
def cosine(at: Position, cfg: ScheduleConfig) -> float:
    """Half a cosine from peak to floor over the steps after warmup."""
    return _between(at, _cosine_shape(at.progress))


@SCHEDULES.register("linear")
def linear(at: Position, cfg: ScheduleConfig) -> float:
    """A straight line from peak to floor over the steps after warmup."""
    return _between(at, _linear_shape(at.progress))


@SCHEDULES.register("step")
def stepwise(at: Position, cfg: ScheduleConfig) -> float:
    """The peak times gamma once per milestone passed, floored at min_lr_ratio.

    Milestones are fractions of trainer.max_steps counted from step 0, so they move with the run's length;
    each applies from the step nearest fraction x max_steps on (`milestone_steps`).
    """
    passed = sum(at.step >= m for m in milestone_steps(cfg, at.max_steps))
    return max(at.floor, at.peak * cfg.gamma**passed)


def milestone_steps(cfg: ScheduleConfig, max_steps: int) -> list[int]:
    """The steps where the step schedule multiplies the lr by gamma, in order."""
    return sorted(_nearest_step(m, max_steps) for m in cfg.milestones)


def _nearest_step(fraction: float, max_steps: int) -> int:
    # Halves round up (0.25 of 10 steps is step 3), which is what a reader computing by hand expects.
    return math.floor(fraction * max_steps + 0.5)


@SCHEDULES.register("constant")
def constant(at: Position, cfg: ScheduleConfig) -> float:
    """The peak for the whole run; min_lr_ratio is ignored."""
    return at.peak


@SCHEDULES.register("wsd")
def wsd(at: Position, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay: the peak until the last decay_fraction of the run, then decay_shape to the floor.

    The decay is placed by max_steps alone (see `wsd_decay_start`), so a run extended to more steps goes
    back to its stable phase: the new steps train at peak lr and the decay moves to the end of the new run.
    A finished run has already decayed, and its weights are annealed to the floor lr; extending it jumps
    the lr back to the peak without warmup, which usually costs loss until the new decay. The usual practice
    is to branch the extension from a checkpoint taken before the decay began: copy the run directory
    without its later checkpoints/step-* and resume the copy with the larger trainer.max_steps.
    """
    shape = SHAPES.get(cfg.decay_shape)  # first, so an unknown shape fails in the stable phase already
    start = wsd_decay_start(cfg, at.max_steps)
    if at.step < start or start >= at.max_steps:
        return at.peak
    t = min(1.0, (at.step - start) / (at.max_steps - start))
    return _between(at, shape(t))


def wsd_decay_start(cfg: ScheduleConfig, max_steps: int) -> int:
    """The first step of wsd's decay: decay_fraction x max_steps (to the nearest step) before the end, never
    inside the warmup. The lr there is still the peak; it reaches the floor at max_steps."""
    return max(cfg.warmup_steps, max_steps - _nearest_step(cfg.decay_fraction, max_steps))


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    schedule = SCHEDULES.get(cfg.name)  # first, so an unknown name fails at step 0, not after warmup
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        # (step + 1) so the very first update already moves the weights.
        return peak_lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    at = Position(step, max_steps, progress, peak_lr, peak_lr * cfg.min_lr_ratio)
    return schedule(at, cfg)


def validate(cfg: ScheduleConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = SCHEDULES.problems(str(cfg.name))
    if cfg.warmup_steps < 0:
        problems.append(f"schedule.warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        problems.append(f"schedule.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    bad = [m for m in cfg.milestones if not 0.0 < m < 1.0]
    if bad:
        hint = " (fractions of trainer.max_steps, not step numbers)" if any(m >= 1 for m in bad) else ""
        problems.append(f"schedule.milestones: each must be in (0, 1){hint}, got {list(cfg.milestones)}")
    if not 0.0 < cfg.gamma <= 1.0:
        problems.append(f"schedule.gamma: must be in (0, 1], got {cfg.gamma}")
    if not 0.0 <= cfg.decay_fraction <= 1.0:
        problems.append(f"schedule.decay_fraction: must be in [0, 1], got {cfg.decay_fraction}")
    problems += SHAPES.problems(str(cfg.decay_shape))
    return problems


# --- extending a run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """The learning rates of one run: its schedule, peak lr and length."""

    cfg: ScheduleConfig
    peak_lr: float  # optimizer.lr
    max_steps: int  # trainer.max_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.peak_lr, self.max_steps)


def extension_note(before: Curve, after: Curve, step: int, kept_steps: Sequence[int] = ()) -> str:
    """What a resume at `step` gets when the lr curve changed from `before` (saved) to `after`; "" if nothing.

    `kept_steps` are the steps of the run's committed checkpoints: for a wsd run that had begun its decay,
    the note names those from before it, the usual branch point of an extension.
    """
    if before == after or step >= after.max_steps:
        return ""
    was, now = before.lr(step), after.lr(step)
    old = str(before.max_steps)
    if before.cfg.name != after.cfg.name:
        old = f"{before.cfg.name} over {old}"
    moves = f"stays {now:.2e}" if math.isclose(was, now) else f"goes from {was:.2e} to {now:.2e}"
    note = (
        f"schedule={after.cfg.name} over {after.max_steps} steps now (was {old}): lr at step {step} {moves}"
    )
    if after.cfg.name == "step":
        at = ", ".join(map(str, milestone_steps(after.cfg, after.max_steps)))
        return f"{note}; the milestones fall at steps {at}" if at else note
    if after.cfg.name != "wsd":
        return note
    start = wsd_decay_start(after.cfg, after.max_steps)
    phase = "the stable phase" if step < start else "the decay"
    note += f" ({phase}); the decay runs over steps {start}-{after.max_steps}"
    # Weights are annealed once a step below the peak has trained: step old_start itself is still at peak.
    old_start = wsd_decay_start(before.cfg, before.max_steps) if before.cfg.name == "wsd" else step
    if step <= old_start + 1:
        return note
    branch = [s for s in sorted(kept_steps, reverse=True) if s <= old_start]
    kept = f"kept here: step {', step '.join(map(str, branch[:3]))}" if branch else "none is kept here"
    return (
        f"{note}. This run has been decaying since step {old_start}: its weights are annealed and the lr "
        f"jumps back up without warmup. The usual practice branches the extension from a checkpoint at or "
        f"before step {old_start} ({kept}): copy the run directory without its later checkpoints and resume "
        "the copy"
    )
