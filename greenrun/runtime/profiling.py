"""`trainer.profile_every`: a few steps of torch profiler every N steps, so long jobs show where time goes
without paying the profiler's overhead the whole run. Traces open in chrome://tracing or Perfetto.

A window that is still open when the run ends (the last step, a stop, a preemption) is closed and written by
close(): a profiler torn down with the interpreter instead crashes the process after the summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Kineto prints `USDT: ... profiler_start` lines straight to the process's file descriptors; keep them
    out of the log while the profiler starts and stops (nothing of greenrun's prints in between)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved: list[tuple[int, int]] = []
    try:
        with open(os.devnull, "wb") as null:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def validate(every: int, steps: int) -> list[str]:
    """Problems with trainer.profile_every / profile_steps, as config validation reports them."""
    problems = []
    if every < 0:
        problems.append(f"trainer.profile_every: must be >= 0 (0 = off), got {every}")
    if steps < 1:
        problems.append(f"trainer.profile_steps: must be >= 1, got {steps}")
    elif every > 0 and every <= steps:
        problems.append(
            f"trainer.profile_every={every} must be larger than trainer.profile_steps={steps}: "
            "each window must end before the next one starts (e.g. profile_every=500 profile_steps=3)"
        )
    return problems


class Windows:
    def __init__(
        self,
        every: int,
        steps: int,
        out_dir: Path,
        device: torch.device | None,
        note: Callable[[str], None] = log.info,
    ):
        problems = validate(every, steps)
        if problems:
            raise ValueError("; ".join(problems))
        self.every, self.steps, self.out_dir, self.device, self.note = every, steps, out_dir, device, note
        self._prof: torch.profiler.profile | None = None
        self._first = 0  # first step (1-based) of the open window

    def _in_window(self, step: int) -> bool:
        # Never at step 0: the first steps are compile and warm-up, not the steady state worth seeing.
        return self.every > 0 and step >= self.every and step % self.every < self.steps

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap one training step; `step` is the number of steps done before it."""
        if not self._in_window(step):
            yield
            return
        if self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device is not None and self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            with _quiet_native_output():
                self._prof.__enter__()
            self._first = step + 1
        yield
        if step % self.every == self.steps - 1:
            self._finish(last=step + 1)

    def _finish(self, last: int) -> None:
        prof, self._prof = self._prof, None
        if prof is None:
            return
        with _quiet_native_output():
            prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"steps-{self._first:08d}-{last:08d}.json"
        prof.export_chrome_trace(str(out))
        self.note(f"profiler trace written to {out}")

    def close(self, step: int) -> None:
        """Close a window the run ended inside (`step` = steps done), writing what it saw."""
        self._finish(last=step)
