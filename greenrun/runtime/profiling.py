"""`trainer.profile_every`: a few steps of torch profiler every N steps, so long jobs show where time goes
without paying the profiler's overhead the whole run. Traces open in chrome://tracing or Perfetto."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


class Windows:
    def __init__(
        self, every: int, steps: int, out_dir: Path, device: torch.device, note: Callable[[str], None]
    ):
        self.every, self.steps, self.out_dir, self.device, self.note = (
            every,
            max(1, steps),
            out_dir,
            device,
            note,
        )
        self._prof: torch.profiler.profile | None = None

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
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        yield
        if step % self.every == self.steps - 1:
            self._prof.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            out = self.out_dir / f"steps-{step - self.steps + 2:08d}-{step + 1:08d}.json"
            self._prof.export_chrome_trace(str(out))
            self._prof = None
            self.note(f"profiler trace written to {out}")
