"""CPU package energy from Linux's RAPL counters (the powercap files), for the energy figure of a CPU run.

Each package zone's energy_uj counts microjoules and restarts from 0 past max_energy_range_uj. Counters only
say something relative to an earlier read, and only if no more than one wrap happened in between, so the
meter reads them every POLL_S seconds on a daemon thread (a package wraps after minutes at full power).
Nothing here raises after construction: a failed read keeps the last good value, as the NVML counter does.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")
POLL_S = 10.0


class Rapl:
    """Joules of every CPU package since construction, from powercap's intel-rapl zones (AMD's too).

    Sub-zones (core, uncore, dram) lie inside their package and psys overlaps the packages, so only the
    "package-N" zones count. OSError or ValueError: nothing readable here (no powercap, or energy_uj
    readable by root only, as many kernels ship it).
    """

    def __init__(self, root: Path = RAPL_ROOT):
        self._zones: list[tuple[Path, int]] = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") == 1 and (zone / "name").read_text().startswith("package"):
                self._zones.append((zone / "energy_uj", int((zone / "max_energy_range_uj").read_text())))
        if not self._zones:
            raise OSError(f"no RAPL package zone under {root}")
        self._last = [int(path.read_text()) for path, _ in self._zones]
        self.joules = 0.0

    def read(self) -> float:
        """Joules since construction; one wrap per zone since the previous read is allowed for."""
        for i, (path, span) in enumerate(self._zones):
            now, last = int(path.read_text()), self._last[i]
            self.joules += (now - last if now >= last else span - last + now) / 1e6
            self._last[i] = now
        return self.joules


class RaplMeter:
    """A Rapl read every `poll_s` s on a daemon thread, times `share` (this process's part of the host)."""

    def __init__(self, root: Path = RAPL_ROOT, share: float = 1.0, poll_s: float = POLL_S):
        self._rapl = Rapl(root)  # raises when nothing is readable: the caller reports "not measured"
        self.share = share
        self._joules = 0.0
        self._warned = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(poll_s,), name="energy-rapl", daemon=True)
        self._thread.start()

    def read(self) -> float:
        with self._lock:  # the poller and the caller both advance the counters
            try:
                self._joules = self._rapl.read() * self.share
            except (OSError, ValueError) as e:
                if not self._warned:
                    log.warning("RAPL read failed (%s); reporting the last good reading", e)
                    self._warned = True
            return self._joules

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _loop(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self.read()
