"""The run's accounts inside the training loop: each logged window's energy into the ledger (every rank's
joules summed), the budgets checked against the whole run's totals, and the training window.

The ledger's arithmetic lives in runtime/ledger.py, the budgets' in runtime/budget.py and the window's in
runtime/window.py; this module decides when the trainer calls them and makes every rank take the same branch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from greenrun import history
from greenrun.ckpt import checkpoint
from greenrun.config import Config
from greenrun.runtime import budget, distributed, ledger, window
from greenrun.runtime.energy import EnergyMeter

log = logging.getLogger(__name__)


class Accounts:
    """One process's view of the run's books: `log_window` per logged step, `on_eval` per evaluation,
    `outside_window` per step, `state_dict` into every checkpoint and `on_resume` after loading one."""

    def __init__(
        self,
        cfg: Config,
        dist: distributed.Dist,
        meter: EnergyMeter,
        *,
        gpus: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg, self.dist, self.meter, self.clock = cfg, dist, meter, clock
        self.started = clock()  # unix time this process began: the end of a restart's wait
        self.ledger = ledger.Ledger(cfg.energy, gpus, wall_clock=clock)
        self.watch = budget.BudgetWatch(cfg.budget)
        # window.carbon_cmd/carbon_file are local keys: a config read from a bucket arrives without them.
        self.window = window.TrainingWindow(cfg.window, clock=clock)
        self._next_check = 0.0  # rank 0's clock: when the window is read next

    # --- per logged step and evaluation ---

    def add_window(self, tokens: int) -> ledger.Window:
        """The energy since the previous window (every rank's joules summed) into the run's totals."""
        w = self.meter.window()
        if self.dist.world_size > 1:  # the run's energy is every GPU's: a collective, every rank calls it
            device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
            vec = torch.tensor(ledger.rank_vector(w), dtype=torch.float64, device=device)
            torch_dist.all_reduce(vec, op=torch_dist.ReduceOp.SUM)
            w = ledger.from_rank_sum(vec.tolist(), w.seconds)
        self.ledger.add_window(w, tokens, kg_per_kwh=self.window.live_kg_per_kwh())
        return w

    def log_window(self, record: dict[str, Any], tokens: int) -> str:
        """add_window, its figures into `record`, and the budgets' verdict: why the run must end, or ""
        (the same answer on every rank)."""
        w = self.add_window(tokens)
        record.update(self.ledger.snapshot())
        if w.joules is not None and tokens > 0:
            record["j_per_token"] = w.joules / tokens  # this window's, every GPU's joules over its tokens
        return self._agree(self.watch.check(record, self.clock()))

    def on_eval(self, val_loss: float, ramping: bool) -> str:
        """budget.min_improvement_per_kwh's verdict on this evaluation: why it ends the run, or ""."""
        return self._agree(self.watch.on_eval(val_loss, self.ledger.kwh, ramping=ramping))

    def _agree(self, decision: budget.Decision) -> str:
        for message in decision.messages:
            log.warning(message)
        if distributed.any_flag(decision.stop):
            return decision.reason or "a budget ran out on another rank"
        return ""

    # --- the training window ---

    def outside_window(self, force: bool = False) -> str:
        """Why training must pause now, or "": read every window.poll_s by rank 0, agreed by every rank."""
        if not self.window.active:
            return ""
        why = ""
        now = self.clock()
        if self.dist.is_main and (force or now >= self._next_check):
            self._next_check = now + self.cfg.window.poll_s
            is_open, reason = self.window.open_now()
            why = "" if is_open else reason
        if distributed.any_flag(bool(why)):
            return why or "outside the training window (rank 0's reading)"
        return ""

    def wait_for_window(self) -> None:
        """Block until the window opens. The idle machine still costs: its seconds and energy enter the
        totals (and wait_s), with no tokens."""
        self.add_window(0)
        waited = self.window.wait_until_open(say=log.info)
        distributed.barrier()
        self.add_window(0)
        self.ledger.totals.wait_s += waited
        self._next_check = self.clock() + self.cfg.window.poll_s

    # --- checkpoints, resumes and the summary ---

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "budget": self.watch.state_dict()}

    def load_state_dict(self, state: dict[str, Any], *, seconds_before: float, tokens_before: int) -> None:
        self.ledger.load_state_dict(
            state.get("ledger"), seconds_before=seconds_before, tokens_before=tokens_before
        )
        self.watch.load_state_dict(state.get("budget") or {})

    def on_resume(self, checkpoint_path: Path, step: int, metrics_path: Path) -> dict[str, Any]:
        """Count a restart from `checkpoint_path` (call before metrics.jsonl is truncated to `step`): the
        work the killed process did past it and the wait; returns the resume event for metrics.jsonl."""
        lost, last = ledger.previous_process(history.read_metrics(metrics_path), step)
        created = checkpoint.read_manifest(checkpoint_path).get("created")
        event = self.ledger.on_resume(step, created, self.started, lost, last)
        if event["lost_steps"]:
            log.info(
                f"preemption cost: {event['lost_steps']} step(s) trained again"
                + (f", {event['lost_kwh']:.3g} kWh" if event.get("lost_kwh") is not None else "")
            )
        return event

    def summary(self) -> dict[str, Any]:
        return self.ledger.summary()
