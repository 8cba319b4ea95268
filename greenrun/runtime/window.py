"""When a run may train: within set hours (window.hours), and while the grid is clean enough
(window.max_g_per_kwh against a reading from window.carbon_cmd or window.carbon_file).

window.hours is "HH-HH" or "HH:MM-HH:MM", start inclusive, end exclusive; a start after the end wraps past
midnight ("22-06" is 22:00 to 06:00 the next morning), "00-24" is the whole day. It is read in this machine's
local time (its TZ, daylight saving included) unless window.utc=true.

A grid reading is one number, g CO2e per kWh, printed by window.carbon_cmd or held in window.carbon_file. The
command is split with shlex and run without a shell (write a script for pipes), with window.cmd_timeout_s to
answer, and read again at most every window.poll_s. A config that came from elsewhere (a bucket) is data: its
carbon_cmd is never run. The key is declared local, so such configs already take it from this machine's
command line, and TrainingWindow(trusted=False) refuses it besides. A reading that fails is no reading: the
window counts as closed, with the reason. Without window.max_g_per_kwh a reading only feeds the ledger's
kgCO2e.

Outside the window, window.outside=wait waits (wait_until_open, checking every window.poll_s) and exit ends
the process with EXIT_OUTSIDE, the preemption code: a checkpoint is committed, so a scheduler resumes it
later.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from greenrun.core import checks
from greenrun.core.fields import plain
from greenrun.runtime.spot import EXIT_PREEMPTED

log = logging.getLogger(__name__)

EXIT_OUTSIDE = EXIT_PREEMPTED  # window.outside=exit: resumable later, exactly like a preemption
OUTSIDE = ("wait", "exit")
_HOURS = re.compile(r"(\d{1,2})(?::(\d{2}))?-(\d{1,2})(?::(\d{2}))?")
_DAY = 24 * 60  # minutes


@dataclass
class WindowConfig:
    hours: str = plain("")  # train only in these hours: 22-06 (wraps midnight), 22:30-06:00; "" = any
    utc: bool = plain(False)  # read window.hours in UTC; false = this machine's local time (TZ, with DST)
    carbon_cmd: str = plain("", local=True)  # command printing the grid's g CO2e/kWh (no shell); "" = none
    carbon_file: str = plain("", local=True)  # file holding the grid's g CO2e/kWh now; "" = none
    max_g_per_kwh: float = plain(0.0)  # train only while the grid reads at most this g CO2e/kWh; 0 = no limit
    outside: str = plain("wait")  # wait | exit: outside the window, wait for it or exit 75 (resume later)
    poll_s: float = plain(300.0)  # seconds between checks of the window and readings of the grid, > 0
    cmd_timeout_s: float = plain(10.0)  # seconds window.carbon_cmd may take before its reading fails


def parse_hours(text: str) -> tuple[int, int]:
    """(start, end) minutes of the day from "HH-HH" or "HH:MM-HH:MM"; ValueError names what is wrong."""
    found = _HOURS.fullmatch(text.strip())
    if not found:
        raise ValueError(f"{text!r} is not HH-HH or HH:MM-HH:MM, e.g. 22-06")
    h0, m0, h1, m1 = (int(g) if g else 0 for g in found.groups())
    start, end = h0 * 60 + m0, h1 * 60 + m1
    if m0 > 59 or m1 > 59 or start >= _DAY or end > _DAY:
        raise ValueError(f"{text!r}: hours are 00-23 (24 only as an end), minutes 00-59")
    if start == end:
        raise ValueError(f"{text!r} is an empty window; 00-24 is the whole day")
    return start, end


def validate(cfg: WindowConfig) -> list[str]:
    problems = []
    if cfg.hours:
        try:
            parse_hours(cfg.hours)
        except ValueError as e:
            problems.append(f"window.hours: {e}")
    if cfg.carbon_cmd and cfg.carbon_file:
        problems.append("window.carbon_cmd and window.carbon_file both set: keep one source of grid readings")
    if cfg.carbon_cmd:
        try:
            if not shlex.split(cfg.carbon_cmd):
                problems.append("window.carbon_cmd: empty command")
        except ValueError as e:
            problems.append(f"window.carbon_cmd: cannot split it into arguments ({e}); check its quotes")
    if cfg.max_g_per_kwh < 0:
        problems.append(f"window.max_g_per_kwh: must be >= 0 (0 = no limit), got {cfg.max_g_per_kwh}")
    if cfg.max_g_per_kwh > 0 and not (cfg.carbon_cmd or cfg.carbon_file):
        problems.append(
            "window.max_g_per_kwh needs a grid reading: set window.carbon_cmd (a command printing g/kWh) "
            "or window.carbon_file (a file holding it)"
        )
    problems += checks.choice("window.outside", cfg.outside, OUTSIDE)
    for key in ("poll_s", "cmd_timeout_s"):
        if not getattr(cfg, key) > 0:
            problems.append(f"window.{key}: must be > 0 seconds, got {getattr(cfg, key)}")
    return problems


def _reading(text: str) -> float | None:
    """The first word of `text` as g/kWh: a finite number >= 0, else None."""
    words = text.split()
    try:
        value = float(words[0]) if words else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


class TrainingWindow:
    """Whether training may run now. `clock` gives unix seconds and `run` runs the command (both
    injectable for tests); `trusted=False` for a config loaded from elsewhere: carbon_cmd is not run."""

    def __init__(
        self,
        cfg: WindowConfig,
        clock: Callable[[], float] = time.time,
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
        trusted: bool = True,
    ):
        self.cfg = cfg
        self.clock = clock
        self.run = run
        self.trusted = trusted
        self.hours = parse_hours(cfg.hours) if cfg.hours else None
        self._last: tuple[float, float | None, str] | None = None  # (when, g/kWh or None, where or why)

    @property
    def active(self) -> bool:
        """Whether any window is set (else open_now() is always True and nothing needs checking)."""
        return self.hours is not None or self.cfg.max_g_per_kwh > 0

    # --- hours ---

    def _local(self, t: float) -> datetime:
        """t in window.hours' zone: aware UTC, or naive local time (whose .timestamp() knows DST)."""
        return datetime.fromtimestamp(t, timezone.utc) if self.cfg.utc else datetime.fromtimestamp(t)

    def in_hours(self, t: float) -> bool:
        if self.hours is None:
            return True
        start, end = self.hours
        now = self._local(t)
        minute = now.hour * 60 + now.minute + now.second / 60
        return start <= minute < end if start < end else minute >= start or minute < end

    def _until_hours(self, t: float) -> float:
        if self.in_hours(t) or self.hours is None:
            return 0.0
        now = self._local(t)
        opens = now.replace(hour=self.hours[0] // 60, minute=self.hours[0] % 60, second=0, microsecond=0)
        if opens <= now:
            opens += timedelta(days=1)
        return max(0.0, opens.timestamp() - t)

    # --- the grid ---

    def grid_g_per_kwh(self) -> tuple[float | None, str]:
        """(g CO2e/kWh or None, where it came from or why it failed); read at most every window.poll_s."""
        if not (self.cfg.carbon_cmd or self.cfg.carbon_file):
            return None, "no window.carbon_cmd or window.carbon_file"
        now = self.clock()
        if self._last is None or now - self._last[0] >= self.cfg.poll_s:
            self._last = (now, *self._read())
        return self._last[1], self._last[2]

    def live_kg_per_kwh(self) -> float | None:
        """The grid reading in kg CO2e/kWh for the ledger's window, None when there is none."""
        g, _ = self.grid_g_per_kwh()
        return None if g is None else g / 1000.0

    def _read(self) -> tuple[float | None, str]:
        if self.cfg.carbon_file:
            where = f"window.carbon_file={self.cfg.carbon_file}"
            try:
                text = Path(self.cfg.carbon_file).read_text()
            except (OSError, UnicodeDecodeError) as e:
                return None, f"{where}: unreadable ({e})"
            value = _reading(text)
            return value, where if value is not None else f"{where}: holds no number of g/kWh"
        where = "window.carbon_cmd"
        if not self.trusted:
            return None, f"{where} came with a config from elsewhere (a bucket): not run; give it here"
        try:
            done = self.run(
                shlex.split(self.cfg.carbon_cmd),
                capture_output=True,
                text=True,
                timeout=self.cfg.cmd_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, f"{where}: no answer within window.cmd_timeout_s={self.cfg.cmd_timeout_s:g} s"
        except (OSError, ValueError) as e:
            return None, f"{where}: cannot run it ({e})"
        if done.returncode != 0:
            return None, f"{where}: exit status {done.returncode}"
        value = _reading(done.stdout or "")
        return value, where if value is not None else f"{where}: printed no number of g/kWh"

    # --- the answer ---

    def open_now(self) -> tuple[bool, str]:
        """(may train now, why): inside window.hours and the grid at most window.max_g_per_kwh."""
        why = []
        if self.hours is not None:
            zone = "UTC" if self.cfg.utc else "local time"
            t = self.clock()
            if not self.in_hours(t):
                wait = _duration(self._until_hours(t))
                return False, f"outside window.hours={self.cfg.hours} ({zone}); it opens in {wait}"
            why.append(f"inside window.hours={self.cfg.hours} ({zone})")
        limit = self.cfg.max_g_per_kwh
        if limit > 0:
            g, where = self.grid_g_per_kwh()
            if g is None:
                return False, f"no grid reading ({where}): treated as outside the window"
            if g > limit:
                return False, f"grid at {g:g} g CO2e/kWh > window.max_g_per_kwh={limit:g} ({where})"
            why.append(f"grid at {g:g} <= {limit:g} g CO2e/kWh")
        return True, "; ".join(why) or "no training window set"

    def seconds_until_open(self) -> float:
        """0 when open; else until window.hours opens, or window.poll_s when the grid decides."""
        if self.open_now()[0]:
            return 0.0
        until = self._until_hours(self.clock())
        return until if until > 0 else self.cfg.poll_s

    def wait_until_open(
        self, sleep: Callable[[float], None] = time.sleep, say: Callable[[str], None] = log.info
    ) -> float:
        """Block until open_now(), checking at least every window.poll_s; the seconds waited."""
        t0 = self.clock()
        is_open, why = self.open_now()
        while not is_open:
            say(f"not training: {why}")
            sleep(max(1e-3, min(self.seconds_until_open(), self.cfg.poll_s)))
            is_open, why = self.open_now()
        return self.clock() - t0


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"
