"""The run ledger: the whole run's energy, carbon, dollars, GPU-hours and tokens, across every process.

The trainer feeds it one window per logged step (`add`): every rank's joules summed (rank_vector on each
rank, an all-reduce SUM, from_rank_sum), the window's seconds and tokens. The totals travel in the checkpoint
(`state_dict`: plain JSON numbers and one string), so a resumed process continues the run's figures instead
of starting its own, and `summary()` is the whole run, not the last process.

A resume also counts what preemption cost (`on_resume`): everything the killed process spent past the
checkpoint, read from its last metrics.jsonl record (the steps recomputed, their seconds, kWh, kgCO2e and $,
which stay in the totals: they were spent), and the wall seconds nobody trained while waiting for a restart.

Every figure keeps its label. kwh sums the windows whose energy is known; energy_source names every way it was
obtained, in a fixed order ("measured+estimated"), and "unknown" in it says some time has no energy figure
(summary's unmetered_s says how much). $ is None when no GPU-hour price is set, never $0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from greenrun.runtime import carbon, equivalents
from greenrun.runtime.energy import (
    JOULES_PER_KWH,
    EnergyConfig,
    Window,
)

log = logging.getLogger(__name__)

SOURCES = ("measured", "sampled", "estimated", "unknown")  # the labels, in the order a mixed label lists them


def label(sources: Iterable[str]) -> str:
    """One label for energy obtained several ways: "measured", "measured+estimated"... ("unknown": none)."""
    seen = {part for s in sources for part in s.split("+") if part}
    if seen - set(SOURCES):  # a label no meter writes: say unknown rather than pass it on
        seen = (seen & set(SOURCES)) | {"unknown"}
    return "+".join(s for s in SOURCES if s in seen) or "unknown"


# --- summing ranks: the caller all-reduces these vectors (SUM) -------------------------------------------


def rank_vector(window: Window) -> list[float]:
    """This rank's window as numbers to all-reduce with SUM: [joules or NaN if unknown, 1 under its label]."""
    joules = math.nan if window.joules is None else float(window.joules)
    return [joules, *(1.0 if s == window.source else 0.0 for s in SOURCES)]


def from_rank_sum(summed: Sequence[float], seconds: float) -> Window:
    """The run's window from the SUM over ranks of rank_vector, `seconds` being rank 0's window.

    Joules add up; a NaN (some rank's energy unknown) makes the whole window unknown, since a sum over some of
    the GPUs is not the run's. The label names every rank's source ("measured+sampled").
    """
    joules, counts = float(summed[0]), summed[1:]
    if math.isnan(joules):
        return Window(None, seconds, "unknown")
    return Window(joules, seconds, label(s for s, n in zip(SOURCES, counts, strict=True) if n > 0))


# --- the totals ------------------------------------------------------------------------------------------


@dataclass
class Totals:
    """The run's cumulative figures, every process included: what state_dict saves."""

    train_s: float = 0.0  # training wall seconds, the killed processes' work past their checkpoint included
    metered_s: float = 0.0  # of train_s, the seconds whose energy is known
    tokens: int = 0  # tokens of the steps the run kept (a recomputed step counts once)
    metered_tokens: int = 0  # of tokens, those trained in windows whose energy is known
    gpu_hours: float = 0.0  # GPUs x training hours
    priced_gpu_hours: float = 0.0  # of gpu_hours, those a price was set for
    device_kwh: float = 0.0  # what the meters saw (known windows), before PUE
    kwh: float = 0.0  # at the wall: device_kwh x PUE
    kgco2e: float = 0.0  # kwh x the grid intensity of each window
    usd: float = 0.0  # priced_gpu_hours x the price of each window
    sources: str = ""  # label of every window so far
    resumes: int = 0  # restarts from a checkpoint
    lost_steps: int = 0  # steps trained past a checkpoint by a process that died, so trained again
    lost_s: float = 0.0  # what those processes spent past their checkpoint: seconds,
    lost_kwh: float = 0.0  # ... kWh at the wall,
    lost_kgco2e: float = 0.0  # ... kg CO2e,
    lost_usd: float = 0.0  # ... $
    lost_gpu_hours: float = 0.0  # ... and GPU-hours (all in the totals above too)
    lost_unknown: int = 0  # resumes whose lost work has no figures (the dead process left no ledger record)
    wait_s: float = 0.0  # wall seconds between a dead process's last sign of life and the resume's start
    wait_unknown: int = 0  # resumes whose waiting time is unknown


# Record key -> Totals field that on_resume compares: what the killed process added after its checkpoint.
_CARRIED = {
    "train_s": "train_s",
    "kwh": "kwh",
    "kgco2e": "kgco2e",
    "usd": "usd",
    "gpu_hours": "gpu_hours",
    "lost_steps_total": "lost_steps",
    "wait_s_total": "wait_s",
    "resumes": "resumes",
}


class Ledger:
    """Cumulative totals of one run for `gpus` GPUs (the world size of a GPU run, 0 on a CPU run)."""

    def __init__(self, cfg: EnergyConfig, gpus: int, wall_clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.gpus = gpus
        self.wall_clock = wall_clock  # unix seconds: the "time" of each record, for the wait after a kill
        self.totals = Totals()
        self.last: Window | None = None  # the latest window this process added: power_w

    # --- feeding it ---

    def add(
        self,
        joules: float | None,
        seconds: float,
        tokens: int,
        source: str,
        *,
        kg_per_kwh: float | None = None,
    ) -> None:
        """One logged window of the whole run: device joules of every rank (None = unknown), its seconds, its
        tokens, and how the joules were obtained. `kg_per_kwh` is a live grid reading for this window
        (window.carbon_cmd); None = energy.grid_kg_per_kwh or the region's figure."""
        if seconds < 0 or tokens < 0:
            raise ValueError(
                f"a window lasts >= 0 s and trains >= 0 tokens, got {seconds} s, {tokens} tokens"
            )
        if joules is not None and (math.isnan(joules) or joules < 0):
            log.warning("ledger: a window of %s J is no reading; its energy is counted as unknown", joules)
            joules = None
        if joules is None:
            source = "unknown"
        elif label([source]) == "unknown":
            raise ValueError(f"{joules} J labelled {source!r}: known energy says how it was obtained")
        t = self.totals
        gpu_hours = self.gpus * seconds / 3600.0
        t.train_s += seconds
        t.tokens += tokens
        t.gpu_hours += gpu_hours
        price = self._price()
        if price is not None:
            t.usd += gpu_hours * price
            t.priced_gpu_hours += gpu_hours
        if joules is not None:
            intensity = kg_per_kwh if kg_per_kwh is not None else carbon.grid_intensity(self.cfg)[0]
            device_kwh = joules / JOULES_PER_KWH
            t.device_kwh += device_kwh
            t.kwh += device_kwh * self.cfg.pue
            t.kgco2e += device_kwh * self.cfg.pue * intensity
            t.metered_s += seconds
            t.metered_tokens += tokens
        t.sources = label([t.sources, source])
        self.last = Window(joules, seconds, source)

    def add_window(self, window: Window, tokens: int, *, kg_per_kwh: float | None = None) -> None:
        """add() for a Window (from_rank_sum's, or a single process's EnergyMeter.window())."""
        self.add(window.joules, window.seconds, tokens, window.source, kg_per_kwh=kg_per_kwh)

    # --- the figures ---

    def _price(self) -> float | None:
        return carbon.gpu_hour_price(self.cfg, self.cfg.pricing) if self.gpus > 0 else None

    @property
    def metered(self) -> bool:
        """Whether any energy figure is known (else kwh, kgco2e and tokens_per_kwh are None)."""
        return label([self.totals.sources]) != "unknown"

    @property
    def kwh(self) -> float | None:
        return self.totals.kwh if self.metered else None

    @property
    def kgco2e(self) -> float | None:
        return self.totals.kgco2e if self.metered else None

    @property
    def usd(self) -> float | None:
        """$ so far; None when nothing was priced (no price set, or a CPU run, which rents no GPU-hours)."""
        priced = self.totals.priced_gpu_hours > 0 or self._price() is not None
        return self.totals.usd if priced else None

    @property
    def tokens_per_kwh(self) -> float | None:
        """Tokens kept per kWh spent, over the windows whose energy is known (lost work lowers it)."""
        t = self.totals
        return t.metered_tokens / t.kwh if self.metered and t.kwh > 0 else None

    def snapshot(self) -> dict[str, Any]:
        """The figures for this step's metrics.jsonl record, cumulative over the whole run but power_w
        (the latest window's mean device power, every GPU, before PUE). The last three keys and `time` let a
        later resume tell what the process spent after its checkpoint (on_resume)."""
        t = self.totals
        return {
            "kwh": self.kwh,
            "kgco2e": self.kgco2e,
            "usd": self.usd,
            "gpu_hours": t.gpu_hours,
            "tokens_per_kwh": self.tokens_per_kwh,
            "power_w": self.last.power_w if self.last is not None else None,
            "energy_source": label([t.sources]),
            "train_s": t.train_s,
            "lost_steps_total": t.lost_steps,
            "wait_s_total": t.wait_s,
            "resumes": t.resumes,
            "time": self.wall_clock(),
        }

    def summary(self) -> dict[str, Any]:
        """The whole run for summary.json: every process, lost work and waiting included."""
        t = self.totals
        kwh, kg, usd = self.kwh, self.kgco2e, self.usd
        intensity, where = carbon.grid_intensity(self.cfg)
        return {
            "kwh": kwh,  # at the wall
            "device_kwh": t.device_kwh if self.metered else None,
            "kgco2e": kg,
            "usd": usd,
            "gpu_hours": t.gpu_hours,
            "tokens": t.tokens,
            "train_s": t.train_s,
            "tokens_per_kwh": self.tokens_per_kwh,
            "energy_source": label([t.sources]),
            "metered_s": t.metered_s,
            "unmetered_s": max(0.0, t.train_s - t.metered_s),
            "unpriced_gpu_hours": max(0.0, t.gpu_hours - t.priced_gpu_hours) if usd is not None else None,
            "pue": self.cfg.pue,
            "grid_kg_per_kwh": intensity,  # today's figure; windows with a live reading used theirs
            "grid_source": where,
            "pricing": self.cfg.pricing,
            "usd_per_gpu_hour": self._price(),
            **equivalents.compute(kwh, kg),  # car km, phone charges, tree-years (runtime/equivalents.py)
            "preemption": {
                "resumes": t.resumes,
                "lost_steps": t.lost_steps,
                "lost_s": t.lost_s,
                "lost_kwh": t.lost_kwh,
                "lost_kgco2e": t.lost_kgco2e,
                "lost_usd": t.lost_usd if usd is not None else None,
                "lost_gpu_hours": t.lost_gpu_hours,
                "lost_unknown": t.lost_unknown,
                "wait_s": t.wait_s,
                "wait_unknown": t.wait_unknown,
            },
        }

    # --- checkpoints and resumes ---

    def state_dict(self) -> dict[str, Any]:
        """The totals as plain JSON numbers (and the label string), for the checkpoint's metadata."""
        return dataclasses.asdict(self.totals)

    def load_state_dict(
        self, state: dict[str, Any] | None, *, seconds_before: float = 0.0, tokens_before: int = 0
    ):
        """Restore the totals a checkpoint saved. A checkpoint without them (written before the ledger) says
        only how long earlier processes trained (`seconds_before`, trainer wall_s) and on how many tokens:
        that time enters the totals with its energy unknown, so nothing is left out silently."""
        self.totals, self.last = Totals(), None
        if not state:
            if seconds_before > 0 or tokens_before > 0:
                self.add(None, seconds_before, tokens_before, "unknown")
                self.last = None
            return
        bad = []
        for f in dataclasses.fields(Totals):
            value = state.get(f.name)
            if value is None:
                continue
            if f.name == "sources" and isinstance(value, str):
                self.totals.sources = label([value]) if value else ""
            elif f.name != "sources" and _count(value):
                setattr(self.totals, f.name, type(f.default)(value))
            else:
                bad.append(f"{f.name}={value!r}")
        if bad:  # a checkpoint's metadata is data: a bad figure is dropped, and the label says so
            log.warning("ledger: checkpoint figures %s are not counts; counted as unknown", ", ".join(bad))
            self.totals.sources = label([self.totals.sources, "unknown"])

    def on_resume(
        self,
        checkpoint_step: int,
        checkpoint_wall_time: float | None,
        resumed_at: float,
        steps_lost: int,
        last_record: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Count one restart, after load_state_dict(); returns the resume event for metrics.jsonl.

        `checkpoint_wall_time`: unix time the checkpoint was committed (its manifest's "created"), None if
        unknown; `resumed_at`: unix time this process started; `steps_lost`: steps the killed process trained
        past the checkpoint; `last_record`: its last metrics record carrying ledger figures (previous_process
        finds both). What that record shows beyond the restored totals is the lost work: it enters the totals.
        The wait runs from the later of the commit and that record's time to `resumed_at`. The event counts
        everything since the checkpoint: a process that resumed from it and died too adds its share.
        """
        t = self.totals
        carried = self._carried(last_record)
        lost_s = carried.get("train_s")
        if lost_s is None:
            if steps_lost > 0:  # work was lost and nothing says what it cost: the totals miss it
                t.lost_unknown += 1
                t.sources = label([t.sources, "unknown"])
        else:
            t.train_s += lost_s
            t.lost_s += lost_s
            t.gpu_hours += carried.get("gpu_hours") or 0.0
            t.lost_gpu_hours += carried.get("gpu_hours") or 0.0
            if carried.get("kwh") is not None:
                t.kwh += carried["kwh"]
                t.lost_kwh += carried["kwh"]
                t.device_kwh += carried["kwh"] / self.cfg.pue
                t.kgco2e += carried.get("kgco2e") or 0.0
                t.lost_kgco2e += carried.get("kgco2e") or 0.0
                t.metered_s += lost_s
            if carried.get("usd") is not None:
                t.usd += carried["usd"]
                t.lost_usd += carried["usd"]
                t.priced_gpu_hours += carried.get("gpu_hours") or 0.0
            if lost_s > 0:  # the label of what was spent past the checkpoint joins the run's
                seen = (last_record or {}).get("energy_source")
                known = isinstance(seen, str) and carried.get("kwh") is not None
                t.sources = label([t.sources, seen if known else "unknown"])
        lost_steps = max(0, steps_lost) + int(carried.get("lost_steps") or 0)
        t.lost_steps += lost_steps
        t.resumes += 1 + int(carried.get("resumes") or 0)
        t.wait_s += carried.get("wait_s") or 0.0
        stamps = (checkpoint_wall_time, (last_record or {}).get("time"))
        times = [x for x in stamps if _count(x)]
        wait = max(0.0, resumed_at - max(times)) if times else None
        if wait is None:
            t.wait_unknown += 1
        else:
            t.wait_s += wait
        return {  # since the checkpoint, every process that died past it included
            "event": "resume",
            "step": checkpoint_step,
            "lost_steps": lost_steps,
            "lost_s": lost_s,
            "wait_s": None if wait is None else wait + (carried.get("wait_s") or 0.0),
            "lost_kwh": carried.get("kwh"),
        }

    def _carried(self, record: dict[str, Any] | None) -> dict[str, float | None]:
        """What `record` (a killed process's last snapshot) holds beyond the restored totals, key by key."""
        if not record:
            return {}
        out: dict[str, float | None] = {}
        for key, field in _CARRIED.items():
            then = record.get(key)  # None where that figure was unknown (no energy, no price)
            out[field] = max(0.0, then - getattr(self.totals, field)) if _count(then) else None
        return out


def _count(value: Any) -> bool:
    """Whether a value read back from JSON is a usable figure: a finite number >= 0 (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


def previous_process(records: Iterable[dict[str, Any]], checkpoint_step: int) -> tuple[int, dict | None]:
    """(steps lost, the last record with ledger figures) from metrics.jsonl as the killed process left it:
    read it before runs.truncate_metrics drops the steps past the checkpoint. The furthest step any record
    names (a preempt event's included) minus the checkpoint's step is the work done again."""
    furthest, last = checkpoint_step, None
    for record in records:
        step = record.get("step")
        if isinstance(step, int):
            furthest = max(furthest, step)
        if "train_s" in record and "event" not in record:
            last = record
    return furthest - checkpoint_step, last
