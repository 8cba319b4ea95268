"""Budgets for a run's kWh, kg CO2e, dollars and GPU-hours, a floor on what each kWh still buys, and the
health of checkpoint uploads: decisions only, as pure functions of what they are shown.

BudgetWatch.check(totals, now) compares the ledger's whole-run totals (Ledger.snapshot or summary) with each
budget: past budget.warn_at of one it warns, at most once every budget.warn_every_s per budget (a budget that
gets worse, warn -> spent, warns at once); a spent budget stops the run when budget.action=stop. A budget on a
figure the ledger does not know (no energy reading, no price) says so once instead of passing silently.
BudgetWatch.on_eval(val_loss, kwh) stops the run when the validation loss improved by less than
budget.min_improvement_per_kwh per kWh over the last budget.improvement_evals evaluations.
UploadHealth.observe(ok) counts consecutive failed checkpoint uploads. Nothing here deletes anything: a
stop is a decision the trainer carries out by committing a checkpoint; the last verified remote one stays.

`now` is the caller's clock (unix seconds), so tests drive it by hand; state_dict() holds which warnings
fired and when, and the evaluation window, so a resumed run neither repeats nor forgets them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from greenrun.core import checks
from greenrun.core.fields import plain

ACTIONS = ("warn", "stop")


@dataclass
class BudgetConfig:
    kwh: float = plain(0.0)  # kWh at the wall for the whole run (every process, lost work too); 0 = no budget
    kgco2: float = plain(0.0)  # kg CO2e for the whole run; 0 = no budget
    dollars: float = plain(0.0)  # $ for the whole run (needs a GPU-hour price, energy.*usd*); 0 = no budget
    gpu_hours: float = plain(0.0)  # GPU-hours for the whole run; 0 = no budget
    warn_at: float = plain(0.8)  # warn once a budget is this fraction spent, in (0, 1]
    action: str = plain("warn")  # warn | stop: what a spent budget does (stop: checkpoint and end the run)
    warn_every_s: float = plain(900.0)  # seconds between repeats of one budget's warning; 0 = only on change
    min_improvement_per_kwh: float = plain(0.0)  # stop when val loss gains < this many nats per kWh; 0 = off
    improvement_evals: int = plain(3)  # evaluations the improvement per kWh is measured over, >= 1


# budget key -> (the ledger's figure, its unit in messages)
_FIGURES = {
    "kwh": ("kwh", "kWh"),
    "kgco2": ("kgco2e", "kg CO2e"),
    "dollars": ("usd", "$"),
    "gpu_hours": ("gpu_hours", "GPU-hours"),
}
_LEVELS = ("ok", "warn", "spent")


def validate(cfg: BudgetConfig) -> list[str]:
    problems = []
    for key in (*_FIGURES, "warn_every_s", "min_improvement_per_kwh"):
        value = getattr(cfg, key)
        if not value >= 0:
            problems.append(f"budget.{key}: must be >= 0 (0 = off), got {value}")
    if not 0 < cfg.warn_at <= 1:
        problems.append(f"budget.warn_at: a fraction of the budget in (0, 1], e.g. 0.8; got {cfg.warn_at}")
    problems += checks.choice("budget.action", cfg.action, ACTIONS)
    if cfg.improvement_evals < 1:
        problems.append(f"budget.improvement_evals: must be >= 1, got {cfg.improvement_evals}")
    return problems


@dataclass
class Decision:
    """What a check found: stop the run (after a checkpoint), and the lines to log."""

    stop: bool = False  # end the run: commit a checkpoint, then exit as a finished run would
    messages: list[str] = field(default_factory=list)  # warnings to log, already rate-limited
    reason: str = ""  # why it stops, for summary.json ("" while it does not)


class BudgetWatch:
    """The budgets of one run: `check` per logged window, `on_eval` per validation loss."""

    def __init__(self, cfg: BudgetConfig):
        self.cfg = cfg
        self.level: dict[str, str] = {}  # budget key -> ok | warn | spent | unknown, as last reported
        self.warned_at: dict[str, float] = {}  # budget key -> when its warning was last logged (unix s)
        self.evals: list[tuple[float, float]] = []  # (val_loss, kwh) of the latest evaluations

    def check(self, totals: dict[str, Any], now: float) -> Decision:
        """Compare the run's totals (kwh, kgco2e, usd, gpu_hours; None = unknown) with every budget."""
        decision = Decision()
        for key, (figure, unit) in _FIGURES.items():
            limit = getattr(self.cfg, key)
            if limit <= 0:
                continue
            spent = totals.get(figure)
            if spent is None:
                if self.level.get(key) != "unknown":
                    self.level[key] = "unknown"
                    decision.messages.append(
                        f"budget.{key}={limit:g} cannot be checked: the run's {unit} is unknown "
                        f"({_why_unknown(key)})"
                    )
                continue
            fraction = spent / limit
            level = "spent" if fraction >= 1 else "warn" if fraction >= self.cfg.warn_at else "ok"
            before = self.level.get(key, "ok")
            worse = _LEVELS.index(level) > (_LEVELS.index(before) if before in _LEVELS else 0)
            self.level[key] = level
            if level == "ok":
                continue
            text = f"budget.{key}: {spent:.4g} of {limit:g} {unit} spent ({fraction:.0%})"
            if level == "spent" and self.cfg.action == "stop":
                decision.stop = True
                decision.reason = decision.reason or f"{text}; budget.action=stop"
                decision.messages.append(f"{text}: stopping (budget.action=stop)")
                continue
            due = now - self.warned_at.get(key, -math.inf) >= self.cfg.warn_every_s > 0
            if worse or due:
                self.warned_at[key] = now
                tail = "; set budget.action=stop to end runs here" if level == "spent" else ""
                decision.messages.append(text + tail)
        return decision

    def on_eval(self, val_loss: float, kwh: float | None, ramping: bool = False) -> Decision:
        """One validation loss at the run's kWh so far. While a curriculum still adds harder data (`ramping`)
        losses are not comparable, so the window starts afresh; an unknown kWh judges nothing."""
        k = self.cfg.min_improvement_per_kwh
        if k <= 0 or kwh is None or not math.isfinite(val_loss) or ramping:
            if ramping:
                self.evals = []
            return Decision()
        self.evals = [*self.evals, (val_loss, kwh)][-(self.cfg.improvement_evals + 1) :]
        if len(self.evals) <= self.cfg.improvement_evals:
            return Decision()
        (loss0, kwh0), (loss1, kwh1) = self.evals[0], self.evals[-1]
        if kwh1 <= kwh0:  # no energy spent between them (or no reading yet): nothing to divide by
            return Decision()
        rate = (loss0 - loss1) / (kwh1 - kwh0)
        if rate >= k:
            return Decision()
        n = self.cfg.improvement_evals
        why = (
            f"validation loss fell {loss0 - loss1:.4g} over the last {n} evaluations for "
            f"{kwh1 - kwh0:.4g} kWh: {rate:.4g} per kWh < budget.min_improvement_per_kwh={k:g}"
        )
        return Decision(stop=True, messages=[why + ": stopping"], reason=why)

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": dict(self.level),
            "warned_at": dict(self.warned_at),
            "evals": [list(e) for e in self.evals],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level = {str(k): str(v) for k, v in state.get("level", {}).items()}
        self.warned_at = {str(k): float(v) for k, v in state.get("warned_at", {}).items()}
        self.evals = [(float(a), float(b)) for a, b in state.get("evals", [])]


def _why_unknown(key: str) -> str:
    if key == "dollars":
        return (
            "set energy.usd_per_gpu_hour, or energy.spot_usd_per_gpu_hour / energy.on_demand_usd_per_gpu_hour"
        )
    return "no energy reading: install nvidia-ml-py on a GPU machine, or set energy.cpu_watts to estimate"


# --- checkpoint uploads -------------------------------------------------------------------------------------


def upload_problems(max_failed_uploads: int, on_failed_uploads: str, prefix: str = "storage.") -> list[str]:
    """Validation of the two upload-health keys (they live with the storage config)."""
    problems = checks.choice(f"{prefix}on_failed_uploads", on_failed_uploads, ACTIONS)
    if max_failed_uploads < 0:
        problems.append(f"{prefix}max_failed_uploads: must be >= 0 (0 = never act), got {max_failed_uploads}")
    return problems


class UploadHealth:
    """Consecutive failed checkpoint uploads: after `max_failed` in a row, warn or stop (`action`).

    Each failure past the limit warns again only every `max_failed` failures. A stop means the newest
    checkpoints exist on this disk only: the trainer commits one locally and exits with spot.EXIT_LOCAL_ONLY.
    """

    def __init__(self, max_failed: int, action: str = "warn"):
        self.max_failed = max_failed
        self.action = action
        self.failed = 0  # uploads failed in a row

    def observe(self, ok: bool) -> Decision:
        if ok:
            recovered = self.failed >= self.max_failed > 0
            self.failed = 0
            return Decision(messages=["checkpoint uploads succeed again"] if recovered else [])
        self.failed += 1
        if self.max_failed <= 0 or self.failed < self.max_failed:
            return Decision()
        text = (
            f"{self.failed} checkpoint uploads failed in a row "
            f"(storage.max_failed_uploads={self.max_failed}): newer checkpoints are on this disk only; "
            "the bucket keeps its last verified one"
        )
        if self.action == "stop":
            return Decision(stop=True, messages=[f"{text}: stopping"], reason=text)
        if (self.failed - self.max_failed) % self.max_failed == 0:
            return Decision(messages=[text])
        return Decision()

    def state_dict(self) -> dict[str, Any]:
        return {"failed": self.failed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.failed = int(state.get("failed", 0))
