"""What the figures and tables show of one run: series against tokens or training time, events, totals.

Records carry `tokens` and (since elapsed_s was added) `elapsed_s`, the training seconds of the whole run. An
older run without elapsed_s gets a time axis estimated from its logged throughput (each window's new tokens over
its tok/s), which the figures say. A missing key stays missing: nothing here turns "not logged" into zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from greenrun.report.load import Run, number

# The cumulative ledger's keys, and the older names summary.json's "energy" dict uses for some of them.
LEDGER_KEYS = ("kwh", "kgco2e", "usd", "gpu_hours", "tokens_per_kwh")
OLD_NAMES = {"kgco2e": "kg_co2"}


@dataclass
class Track:
    """step -> tokens and step -> training seconds of one run, to place any step on either axis."""

    steps: np.ndarray
    tokens: np.ndarray
    seconds: np.ndarray | None  # None: no elapsed_s and no tok/s to estimate it from
    seconds_estimated: bool  # True when seconds come from tok/s rather than elapsed_s

    def at(self, steps: np.ndarray | list[float], axis: str) -> np.ndarray | None:
        """Positions of `steps` on the "tokens" or "seconds" axis (None when that axis is unknown)."""
        ys = self.tokens if axis == "tokens" else self.seconds
        if ys is None or len(self.steps) == 0:
            return None
        return np.interp(np.asarray(steps, dtype=float), self.steps, ys)


def track(run: Run) -> Track:
    rows = sorted(
        {int(r["step"]): r for r in run.records if number(r.get("tokens")) is not None}.items()
    )  # one row per step: a val-only line at a step the train line also logged says the same tokens
    steps = np.array([s for s, _ in rows], dtype=float)
    tokens = np.array([float(r["tokens"]) for _, r in rows])
    timed = [(s, number(r.get("elapsed_s"))) for s, r in rows]
    if any(t is not None for _, t in timed):
        known = [(s, t) for s, t in timed if t is not None]
        if known[0][0] > 0:  # the step-0 evaluation logs no elapsed_s: training starts at 0 s
            known.insert(0, (0, 0.0))
        seconds = np.interp(steps, [s for s, _ in known], [t for _, t in known])
        return Track(steps, tokens, seconds, seconds_estimated=False)
    seconds, t, last_tokens, any_rate = [], 0.0, 0.0, False
    for (_, r), n in zip(rows, tokens, strict=True):
        rate = number(r.get("tok_per_s"))
        if rate and rate > 0:
            t += (n - last_tokens) / rate
            any_rate = True
        seconds.append(t)
        last_tokens = n
    return Track(steps, tokens, np.array(seconds) if any_rate else None, seconds_estimated=True)


def column(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that logged `key` as a finite number."""
    pairs = [(float(r["step"]), number(r.get(key))) for r in run.records]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return np.array([s for s, _ in pairs]), np.array([v for _, v in pairs])


def power(run: Run) -> tuple[np.ndarray, np.ndarray, str]:
    """(steps, watts, how): logged power_w, else each window's device joules over its seconds."""
    steps, watts = column(run, "power_w")
    if len(steps):
        return steps, watts, "logged"
    out_s, out_w, prev = [], [], None
    for r in run.records:
        j, t = number(r.get("joules")), number(r.get("elapsed_s"))
        if j is None or t is None:
            continue
        # joules counts from each process's start: a resume resets it, and that window says nothing.
        if prev is not None and j > prev[0] and t > prev[1]:
            out_s.append(float(r["step"]))
            out_w.append((j - prev[0]) / (t - prev[1]))
        prev = (j, t)
    return np.array(out_s), np.array(out_w), "device joules over time"


def events(run: Run, kind: str) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("event") == kind]


def _ledger_value(run: Run, key: str) -> float | None:
    """The run's total for a ledger key: summary's ledger, else the newest record that has it, else the
    older summary.json "energy" dict (which knows kwh, kg_co2, usd and gpu_hours)."""
    ledger = run.summary.get("ledger")
    if isinstance(ledger, dict) and number(ledger.get(key)) is not None:
        return number(ledger[key])
    for r in reversed(run.records):
        if number(r.get(key)) is not None:
            return number(r[key])
    energy = run.summary.get("energy")
    if isinstance(energy, dict):
        return number(energy.get(OLD_NAMES.get(key, key)))
    return None


def _last(run: Run, key: str) -> float | None:
    for r in reversed(run.records):
        if number(r.get(key)) is not None:
            return number(r[key])
    return None


def energy_source(run: Run) -> str:
    """measured | sampled | estimated | unknown, as the ledger or the newest record says."""
    ledger = run.summary.get("ledger")
    found = ledger.get("energy_source") if isinstance(ledger, dict) else None
    for r in reversed(run.records):
        if found is not None:
            break
        found = r.get("energy_source")
    return found if found in ("measured", "sampled", "estimated", "unknown") else "unknown"


def totals(run: Run) -> dict[str, Any]:
    """The run's summary row: every value a float, an int or None (unknown); energy_source a label."""
    s = run.summary
    out: dict[str, Any] = {key: _ledger_value(run, key) for key in LEDGER_KEYS}
    out["steps"] = int(s["step"]) if number(s.get("step")) is not None else _int(_last(run, "step"))
    out["tokens"] = int(s["tokens"]) if number(s.get("tokens")) is not None else _int(_last(run, "tokens"))
    out["wall_s"] = number(s.get("run_wall_s")) or number(s.get("wall_s")) or _last(run, "elapsed_s")
    out["train_loss"] = _last(run, "loss")
    out["val_loss"] = (
        number(s.get("val_loss")) if number(s.get("val_loss")) is not None else _last(run, "val_loss")
    )
    if out["tokens_per_kwh"] is None and out["kwh"] and out["tokens"] is not None:
        out["tokens_per_kwh"] = out["tokens"] / out["kwh"]
    out["energy_source"] = energy_source(run)
    resumes = events(run, "resume")
    out["resumes"] = len(resumes)
    out["preempts"] = len(events(run, "preempt"))
    out["lost_steps"] = int(sum(number(e.get("lost_steps")) or 0 for e in resumes))
    out["lost_s"] = sum(number(e.get("lost_s")) or 0.0 for e in resumes)
    return out


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


# --- the summary row, as text: the terminal table and the HTML table show the same cells ---------------

HEADER = [
    "run",
    "steps",
    "tokens",
    "wall time",
    "train loss",
    "val loss",
    "kWh",
    "kg CO2e",
    "$",
    "GPU-hours",
    "tokens/kWh",
    "energy source",
    "resumes",
    "steps lost",
]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cells(name: str, t: dict[str, Any]) -> list[str]:
    """One run's summary row; "-" for anything the run did not measure."""
    resumes = str(t["resumes"]) + (f" ({t['preempts']} preempted)" if t["preempts"] else "")
    lost = str(t["lost_steps"]) + (f" ({t['lost_s']:.0f} s)" if t["lost_s"] else "")
    return [
        name,
        _num(t["steps"], ","),
        _num(t["tokens"], ","),
        duration(t["wall_s"]),
        _num(t["train_loss"], ".4f"),
        _num(t["val_loss"], ".4f"),
        _num(t["kwh"], ".4g"),
        _num(t["kgco2e"], ".4g"),
        _num(t["usd"], ",.2f"),
        _num(t["gpu_hours"], ".3g"),
        _num(t["tokens_per_kwh"], ",.0f"),
        t["energy_source"],
        resumes,
        lost,
    ]
