"""When a run ends before trainer.max_steps: a validation loss that stopped improving, or a non-finite step.

Early stopping is a pure object fed one validation loss per evaluation: `update(val_loss, step, ramping)`
returns a Decision, and `state_dict()` holds every counter, so a resumed run decides exactly as a straight one.
Every rank sees the same (all-reduced) validation loss and the same `ramping` answer, so every rank decides
alike without talking. `ramping` is the curriculum's answer to "is harder data still being added?": while it
is, evaluations are not comparable with each other, so nothing is compared and nothing stops.

restore_best: the trainer exports the model-only weights (checkpoint.weights_dtype) at each new best, so
export/ always holds the best so far and the final export is already written. That costs one export per
improvement; a copy in host memory would be lost to a kill or a resume unless every checkpoint carried it,
and a best *checkpoint* would write the optimizer state too, on the checkpoint cadence, not the evaluations'.

The non-finite guard checks each step's loss and gradient norm before the optimizer applies the step: `stop`
raises NonFiniteError (the job exits 1 and nothing of that step reaches a checkpoint), `skip` drops the update.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from greenrun.core.fields import plain
from greenrun.core.registry import Registry
from greenrun.runtime import distributed

log = logging.getLogger(__name__)


@dataclass
class EarlyStoppingConfig:
    name: str = plain("none")  # none | on (stop when the validation loss stops improving)
    patience: int = plain(3)  # evaluations in a row without an improvement before the run stops (>= 1)
    min_delta: float = plain(0.0)  # nats: an improvement must beat the best by more than this
    smoothing: float = plain(0.0)  # EMA factor f in [0, 1): s = f*s + (1-f)*val_loss (0 = the raw loss)
    restore_best: bool = plain(True)  # export the best evaluation's weights at the end, not the last ones
    warmup_evals: int = plain(0)  # first evaluations of the run that never count against patience


@dataclass(frozen=True)
class Decision:
    """What one evaluation meant; the latest one is part of the checkpoint."""

    step: int  # the optimizer step the evaluation followed
    value: float  # the monitored validation loss: smoothed when early_stopping.smoothing > 0
    improved: bool  # a new best: these are the weights restore_best exports
    best: float | None  # the best monitored value so far (None: nothing comparable yet)
    best_step: int | None  # the step of that best evaluation
    bad_evals: int  # evaluations in a row that counted against patience
    stop: bool  # the run stops here
    reason: str  # why it stops, for the console and summary.json ("" while it does not)


class Stopper(Protocol):
    best_step: int | None  # the step whose weights are the best so far (None: none yet)

    def update(self, val_loss: float, step: int, ramping: bool) -> Decision: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


STOPPERS: Registry[Callable[[EarlyStoppingConfig], Stopper]] = Registry("early_stopping.name")


@STOPPERS.register("none")
class Never:
    """Trains to trainer.max_steps whatever the validation loss does; keeps no state."""

    best_step: int | None = None

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        pass

    def update(self, val_loss: float, step: int, ramping: bool) -> Decision:
        return Decision(step, val_loss, False, None, None, 0, False, "")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # counters of an earlier `on` stay in that checkpoint; this run does not watch


@STOPPERS.register("on")
class EarlyStopping:
    """Stops after `patience` evaluations in a row that do not beat the best by more than `min_delta`.

    Only evaluations that may stop the run count against patience: those after the first `warmup_evals`, and
    never one while the curriculum ramps. A ramp also forgets the best, since the data under the evaluations
    changes; the first evaluation after it starts the comparison afresh. A non-finite validation loss counts
    as no improvement and stays out of the smoothing (it would poison every later value).
    """

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.evals = 0  # evaluations seen, the warmup ones included
        self.smoothed: float | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last: Decision | None = None

    def update(self, val_loss: float, step: int, ramping: bool) -> Decision:
        self.evals += 1
        finite = math.isfinite(val_loss)
        if finite:
            s = self.cfg.smoothing
            self.smoothed = val_loss if self.smoothed is None else s * self.smoothed + (1 - s) * val_loss
        value = self.smoothed if finite else val_loss
        if ramping:
            self.best, self.best_step = None, None
        improved = finite and not ramping and (self.best is None or self.best - value > self.cfg.min_delta)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        elif ramping or self.evals <= self.cfg.warmup_evals:
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        stop = self.bad_evals >= self.cfg.patience
        reason = self._why() if stop else ""
        self.last = Decision(step, value, improved, self.best, self.best_step, self.bad_evals, stop, reason)
        return self.last

    def _why(self) -> str:
        what = "smoothed validation loss" if self.cfg.smoothing > 0 else "validation loss"
        by = f" by more than {self.cfg.min_delta:g}" if self.cfg.min_delta > 0 else ""
        best = f"best {self.best:.4f} at step {self.best_step}" if self.best is not None else "no best yet"
        return (
            f"the {what} has not improved{by} in {self.bad_evals} evaluations "
            f"({best}; early_stopping.patience={self.cfg.patience})"
        )

    def state_dict(self) -> dict[str, Any]:
        # Plain numbers, strings and None: checkpoint.load reads trainer.pt with weights_only=True.
        return {
            "evals": self.evals,
            "smoothed": self.smoothed,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "last": dataclasses.asdict(self.last) if self.last is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint of a run that did not watch: start watching from here
            return
        self.evals, self.bad_evals = int(state["evals"]), int(state["bad_evals"])
        self.smoothed, self.best, self.best_step = state["smoothed"], state["best"], state["best_step"]
        self.last = Decision(**state["last"]) if state["last"] is not None else None


def build(cfg: EarlyStoppingConfig) -> Stopper:
    return STOPPERS.get(cfg.name)(cfg)


def validate(cfg: EarlyStoppingConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = STOPPERS.problems(str(cfg.name))
    if cfg.patience < 1:
        problems.append(f"early_stopping.patience: must be >= 1, got {cfg.patience}")
    if cfg.min_delta < 0:
        problems.append(f"early_stopping.min_delta: must be >= 0, got {cfg.min_delta}")
    if not 0.0 <= cfg.smoothing < 1.0:
        problems.append(f"early_stopping.smoothing: must be in [0, 1), got {cfg.smoothing}")
    if cfg.warmup_evals < 0:
        problems.append(f"early_stopping.warmup_evals: must be >= 0, got {cfg.warmup_evals}")
    return problems


# --- the non-finite guard ------------------------------------------------------------------------------

NONFINITE_MODES = ("stop", "skip")  # trainer.on_nonfinite
# Skipped steps in a row after which `skip` stops anyway: each step draws another batch, so that many
# non-finite ones in a row means the weights or the learning rate are broken, not one batch.
MAX_SKIPS_IN_A_ROW = 10
_ADVICE = "Lower optimizer.lr, or use precision=bf16 where fp16 overflows"


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient norm or weights: the job ends with exit 1 and this message."""


class NonFiniteGuard:
    """Decides whether each step's update is applied (trainer.on_nonfinite), checked before the update.

    Two ways to use it. check() reads the step's loss and gradient norm on the host at once: the step's one
    device-to-host sync, and the caller applies the update or not. watch() instead returns a device flag that
    an optimizer able to skip on the device consumes (fused Adam/AdamW's `found_inf`: the kernel drops a
    flagged update, and its step count with it), and settle() reads every watched step later in one sync, at
    the next log line or checkpoint: the host never waits for the GPU between steps. Either way a non-finite
    update never reaches the weights, and the counts and `stop` come out the same, `stop` a few steps later.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.skipped = 0  # steps whose update was dropped, in the whole run (resumes with the checkpoint)
        self.in_a_row = 0
        self._pending: list[
            tuple[int, torch.Tensor, bool]
        ] = []  # (step, [loss, norm] on the device, check_norm)
        self._last = (math.nan, math.nan, True)  # the newest settled step: loss, grad norm, applied

    def watch(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, *, check_norm: bool = True
    ) -> torch.Tensor:
        """Queue optimizer step `step`'s check (1-based, as metrics.jsonl); 1.0 on the device = drop its update.

        Both numbers are the mean over ranks, and a mean is non-finite on every rank as soon as one rank's
        value is: all ranks drop the same steps, with no second collective. `check_norm=False` under a loss
        scaler (fp16): an inf gradient there is the scaler's to handle, by skipping the step and lowering its
        scale, and is no failure.
        """
        values = distributed.mean(torch.stack([loss.detach().float(), grad_norm.detach().float()]))
        self._pending.append((step, values, check_norm))
        finite = torch.isfinite(values).all() if check_norm else torch.isfinite(values[0])
        return (~finite).float()

    def settle(self) -> tuple[float, float, bool]:
        """Read every watched step in one sync and decide them in order: (loss, grad norm, applied) of the last."""
        if not self._pending:
            return self._last
        pending, self._pending = self._pending, []
        rows = torch.stack([values for _, values, _ in pending]).tolist()
        newest = pending[-1][0]
        for (step, _, check_norm), (loss, norm) in zip(pending, rows, strict=True):
            applied = math.isfinite(loss) and (math.isfinite(norm) or not check_norm)
            if not applied:
                self._drop(step, loss, norm, later=newest - step)
            else:
                self.in_a_row = 0
            self._last = (loss, norm, applied)
        return self._last

    def check(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, *, check_norm: bool = True
    ) -> tuple[bool, float, float]:
        """(apply the update, mean loss, grad norm) for optimizer step `step`, read now: one sync."""
        self.watch(step, loss, grad_norm, check_norm=check_norm)
        loss_value, norm_value, applied = self.settle()
        return applied, loss_value, norm_value

    def _drop(self, step: int, loss: float, norm: float, *, later: int) -> None:
        what = f"step {step}: loss {loss}, gradient norm {norm}"
        if self.mode == "stop":
            when = f"stopped {later} step(s) later, at the next check" if later else "stopped"
            raise NonFiniteError(
                f"{what}: its update was dropped and the run {when}, so no checkpoint holds a non-finite step. "
                f"{_ADVICE}; trainer.on_nonfinite=skip drops such steps and trains on"
            )
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise NonFiniteError(
                f"{what}: {self.in_a_row} non-finite steps in a row, each on another batch, so the weights or "
                f"the learning rate are broken: stopped. {_ADVICE}"
            )
        log.warning(f"{what}: skipped its update ({self.skipped} step(s) skipped in this run so far)")

    def state_dict(self) -> dict[str, int]:
        """The counts up to the newest settled step: settle() before saving, so none is still pending."""
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every plain floating-point tensor holds only finite values (one device-to-host sync in all)."""
    flags = [torch.isfinite(t).all() for t in tensors if type(t) is torch.Tensor and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
