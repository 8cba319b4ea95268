"""Energy, cost and carbon of a run: a meter for the devices' joules, and the arithmetic that turns them
into kWh at the wall, kg of CO2, dollars and an everyday equivalent.

`energy.sensor` picks how energy is read, from SENSORS: "nvml" reads NVML's per-GPU energy counter
(Volta and newer) and falls back to integrating sampled power draw where the counter is missing;
"cpu_watts" multiplies a stated average power by the time; "none" reports energy as unknown; "auto"
(the default) is nvml where it measures something, else (a CPU run) the CPU packages' RAPL counters, else
cpu_watts when set, else none. The meter must never take a training run down, so every NVML or RAPL
failure degrades the reading instead of raising.

Every reading says how it was obtained (`EnergyMeter.source`, LABELS): "measured" (NVML's counter, RAPL),
"sampled" (integrated NVML power samples), "estimated" (energy.cpu_watts x time) or "unknown" (None, never 0).
Grid intensity and prices come from greenrun.runtime.carbon (energy.region, energy.pricing).

Reads top to bottom: the config and its validation, the meter and its sensors, then the accounting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenrun.core.fields import plain
from greenrun.core.registry import Registry
from greenrun.runtime import carbon, equivalents, rapl

log = logging.getLogger(__name__)

JOULES_PER_KWH = 3.6e6


@dataclass
class EnergyConfig:
    pue: float = plain(1.2)  # data-centre power usage effectiveness, >= 1: 1.1 excellent, ~1.6 typical
    region: str = plain(
        "world"
    )  # grid's kg CO2e/kWh: world | us-west | us-east | eu | apac | aws:us-east-1..
    grid_kg_per_kwh: float = plain(0.0)  # kg CO2e per grid kWh; > 0 overrides energy.region, 0 = the region's
    pricing: str = plain("on_demand")  # spot | on_demand: which price per GPU-hour the $ figures use
    spot_usd_per_gpu_hour: float = plain(0.0)  # $ per GPU-hour on spot/preemptible machines; 0 = not priced
    on_demand_usd_per_gpu_hour: float = plain(0.0)  # $ per GPU-hour on demand; 0 = not priced
    usd_per_gpu_hour: float = plain(0.0)  # $ per GPU-hour whatever energy.pricing says; > 0 overrides both
    cpu_watts: float = plain(0.0)  # stated watts if nothing measures, labelled estimated; 0 = energy unknown
    sensor: str = plain("auto")  # auto | nvml | cpu_watts | none: how energy is read (auto: RAPL on a CPU)


def validate(cfg: EnergyConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = SENSORS.problems(cfg.sensor)
    if cfg.sensor == "cpu_watts" and not cfg.cpu_watts > 0:
        problems.append("energy.sensor=cpu_watts: set energy.cpu_watts to the average power draw (> 0)")
    if cfg.pue < 1.0:
        problems.append(f"energy.pue: must be >= 1 (facility power over IT power), got {cfg.pue}")
    for key in ("grid_kg_per_kwh", "usd_per_gpu_hour", "cpu_watts"):
        if getattr(cfg, key) < 0:
            problems.append(f"energy.{key}: must be >= 0, got {getattr(cfg, key)}")
    return problems + carbon.validate(cfg)


# How each meter method's joules were obtained: the label every energy figure carries.
LABELS = {
    "counter": "measured",
    "rapl": "measured",
    "sampling": "sampled",
    "cpu_watts": "estimated",
    "none": "unknown",
}


@dataclass(frozen=True)
class Window:
    """Energy over one stretch of time (a logged window), and how it was obtained."""

    joules: float | None  # device joules in the window; None = unknown
    seconds: float  # the window's wall seconds
    source: str  # measured | sampled | estimated | unknown

    @property
    def power_w(self) -> float | None:
        """Mean device power over the window (W); None when its energy is unknown or it lasted no time."""
        if self.joules is None or self.seconds <= 0:
            return None
        return self.joules / self.seconds


# --- The meter ------------------------------------------------------------------------------------


def local_gpus() -> list[int]:
    """CUDA ordinals this process trains on: its LOCAL_RANK under torchrun, else GPU 0."""
    return [int(os.environ.get("LOCAL_RANK", "0"))]


def nvml_ids(gpus: list[int], visible: str | None) -> list[int | str]:
    """NVML device ids for CUDA ordinals, given CUDA_VISIBLE_DEVICES (None when unset).

    CUDA renumbers the visible devices from 0 while NVML always sees every GPU, so ordinal i is the
    i-th visible entry: an index (an int) or a UUID such as "GPU-..." (a str). NVML numbers GPUs in
    PCI bus order, which is also CUDA's order on a node of identical GPUs.
    """
    if visible is None:
        return list(gpus)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    return [int(entries[g]) if entries[g].isdigit() else entries[g] for g in gpus]


class EnergyMeter:
    """Joules used by this process's GPUs (on a CPU run: its share of the CPU packages) since start().

    ``method`` says how, as cfg.sensor chose: "counter" (NVML's energy counter), "sampling" (NVML
    power readings every ``sample_s`` seconds, integrated), "rapl" (CPU packages, for a meter without
    GPUs), "cpu_watts" (cfg.cpu_watts times elapsed time) or "none" (read() gives None); ``source``
    is its label (LABELS). ``available`` is True when NVML measures something. Under DDP each rank
    meters its own GPU (the default) and the trainer sums the readings, or one rank passes every local
    ordinal in ``gpus``. RAPL sees the whole host, so each of LOCAL_WORLD_SIZE processes reports its
    share: the sum over a host's ranks is the host's package energy. ``window()`` gives the joules,
    seconds and label since the previous window, for the ledger.
    """

    def __init__(
        self,
        cfg: EnergyConfig | None = None,
        gpus: list[int] | None = None,
        sample_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rapl_root: Path | None = None,
    ):
        self.cfg = cfg or EnergyConfig()
        self.gpus = local_gpus() if gpus is None else list(gpus)
        self.sample_s = sample_s
        self.clock = clock  # injectable so tests can drive time
        self.rapl_root = rapl_root or rapl.RAPL_ROOT
        self.available = False
        self.method = "none"
        self._nvml: Any = None
        self._rapl: rapl.RaplMeter | None = None
        self._rapl_share = 1.0 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._win_j: float | None = 0.0  # the reading and elapsed time at the previous window()
        self._win_t = 0.0
        self._handles: list[Any] = []
        self._t0: float | None = None
        self._start_mj: list[int] = []
        self._last_j: float | None = None  # last good reading, returned when NVML fails mid-run
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._joules = 0.0  # sampling: energy integrated up to _last_t
        self._closed_j: float | None = None  # the reading frozen by close()
        self._closed = False
        self._warned = False  # a failing GPU would otherwise log on every read
        self._last_t = 0.0
        self._last_w = 0.0

    def __enter__(self) -> EnergyMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Open what cfg.sensor reads, pick its method and zero the reading."""
        self.close()  # a second start() begins afresh rather than leaking a sampler thread
        self._stop.clear()
        self.method, self._handles, self._last_j, self._t0 = "none", [], None, None
        self._joules, self._closed, self._warned, self._rapl = 0.0, False, False, None
        self.method = SENSORS.get(self.cfg.sensor)(self)
        if self._t0 is None:  # a sensor starts the clock itself when opening its source takes time
            self._start_clock()
        self.available = self.method in ("counter", "sampling")
        self._win_j, self._win_t = self.read(), self.elapsed

    @property
    def source(self) -> str:
        """How read() obtains its joules: measured | sampled | estimated | unknown."""
        return LABELS[self.method]

    def window(self) -> Window:
        """Joules and seconds since the previous window() (or start()), with how they were obtained."""
        joules, now = self.read(), self.elapsed
        delta = None if joules is None or self._win_j is None else joules - self._win_j
        seconds = now - self._win_t
        self._win_j, self._win_t = joules, now
        return Window(delta, seconds, self.source if delta is not None else "unknown")

    def read(self) -> float | None:
        """Joules since start(); None when energy is unknown (no NVML and cpu_watts = 0)."""
        if self._t0 is None:
            raise RuntimeError("EnergyMeter.read() before start()")
        if self._closed:
            return self._closed_j
        now = self.clock()
        if self.method == "counter":
            try:
                mj = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
                self._last_j = sum(b - a for a, b in zip(self._start_mj, mj, strict=True)) / 1000.0
            except Exception as e:  # a failed read must not stop training: keep the last good value
                if not self._warned:
                    log.warning("NVML energy read failed (%s); reporting the last good reading", e)
                    self._warned = True
            return self._last_j
        if self.method == "sampling":
            with self._lock:
                # Extend the last sample to now, so a read between samples is not up to 0.2 s stale.
                return self._joules + self._last_w * max(0.0, now - self._last_t)
        if self.method == "rapl" and self._rapl is not None:
            return self._rapl.read()
        if self.method == "cpu_watts":
            return self.cfg.cpu_watts * (now - self._t0)
        return None

    @property
    def elapsed(self) -> float:
        """Seconds since start()."""
        return 0.0 if self._t0 is None else self.clock() - self._t0

    def close(self) -> None:
        """Stop the sampler and release NVML, freezing read() at its current value; safe to call twice."""
        if self._t0 is not None and not self._closed:
            self._closed_j = self.read()
            self._closed = True
        self._stop.set()
        if self._rapl is not None:
            self._rapl.close()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.sample_s + 1.0)
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:
                log.debug("nvmlShutdown failed: %s", e)
            self._nvml = None

    # --- internals ---

    def _open_nvml(self) -> None:
        if not self.gpus:
            return
        try:
            import pynvml  # from the nvidia-ml-py package; optional, so imported only here
        except ImportError:
            log.info("pynvml not installed (pip install nvidia-ml-py); GPU energy is not measured")
            return
        try:
            pynvml.nvmlInit()
        except Exception as e:  # no driver, or a container without libnvidia-ml
            log.info("NVML unavailable (%s); GPU energy is not measured", e)
            return
        self._nvml = pynvml
        try:
            for dev in nvml_ids(self.gpus, os.environ.get("CUDA_VISIBLE_DEVICES")):
                if isinstance(dev, int):
                    self._handles.append(pynvml.nvmlDeviceGetHandleByIndex(dev))
                else:
                    self._handles.append(pynvml.nvmlDeviceGetHandleByUUID(dev))
        except Exception as e:  # a MIG slice or a bad CUDA_VISIBLE_DEVICES entry: measure nothing
            log.warning(
                "could not map GPUs %s to NVML devices (%s); GPU energy is not measured", self.gpus, e
            )
            self._handles = []

    def _power_w(self) -> float:
        return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0  # mW -> W

    def _start_clock(self) -> None:
        self._t0 = self.clock()

    def _start_nvml(self) -> str:
        """The best method NVML offers for these GPUs: "counter", "sampling" or "none"."""
        self._open_nvml()
        self._start_clock()  # after nvmlInit, whose start-up is not the run's energy
        if not self._handles:
            return "none"
        try:
            self._start_mj = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            return "counter"
        except Exception as e:  # older GPUs answer NotSupported; any failure just means no counter
            log.info("NVML energy counter unavailable (%s); sampling power instead", e)
            return "sampling" if self._start_sampling() else "none"

    def _start_sampling(self) -> bool:
        try:
            self._last_w = self._power_w()
        except Exception as e:
            log.warning("NVML power readings unavailable too (%s); GPU energy is not measured", e)
            return False
        self._last_t = self._t0 if self._t0 is not None else self.clock()
        self._thread = threading.Thread(target=self._sample_loop, name="energy-sampler", daemon=True)
        self._thread.start()
        return True

    def _start_rapl(self) -> str:
        """ "rapl" when the CPU packages' counters are readable here, else "none"."""
        try:
            self._rapl = rapl.RaplMeter(self.rapl_root, share=self._rapl_share)
        except (OSError, ValueError) as e:
            log.info("RAPL unreadable (%s); CPU energy is not measured", e)
            return "none"
        return "rapl"

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.sample_s):
            try:
                watts = self._power_w()
            except Exception:  # skip this sample; the previous power is held until a read succeeds
                continue
            now = self.clock()
            with self._lock:
                # Trapezoid between the previous and this sample.
                self._joules += 0.5 * (self._last_w + watts) * max(0.0, now - self._last_t)
                self._last_w, self._last_t = watts, now


# --- Sensors: energy.sensor -> a function that opens what it reads and returns the meter's method ------

SENSORS: Registry[Callable[[EnergyMeter], str]] = Registry("energy.sensor")


@SENSORS.register("nvml")
def nvml_sensor(meter: EnergyMeter) -> str:
    """NVML's energy counter, else sampled power; "none" where NVML measures nothing."""
    return meter._start_nvml()


@SENSORS.register("cpu_watts")
def cpu_watts_sensor(meter: EnergyMeter) -> str:
    """energy.cpu_watts times the elapsed time: an estimate for machines without a GPU counter."""
    return "cpu_watts" if meter.cfg.cpu_watts > 0 else "none"


@SENSORS.register("none")
def no_sensor(meter: EnergyMeter) -> str:
    """Energy unknown: reported as unknown, never as zero."""
    return "none"


@SENSORS.register("auto")
def auto_sensor(meter: EnergyMeter) -> str:
    """nvml where it measures something, else RAPL for a meter without GPUs, else cpu_watts if set, else none.

    RAPL only stands in on a CPU run: on a GPU run it would count the host's CPUs as if they were the GPUs.
    """
    method = nvml_sensor(meter)
    if method == "none" and not meter.gpus:
        method = meter._start_rapl()
    if method == "none" and meter.cfg.cpu_watts > 0:
        return "cpu_watts"
    return method


# --- Accounting -----------------------------------------------------------------------------------


def account(joules: float | None, seconds: float, gpus: int, cfg: EnergyConfig) -> dict[str, float | None]:
    """Turn a run's device joules and duration into wall energy, carbon, cost and equivalents.

    Keys: seconds, gpu_hours, device_kwh (what the meter saw), kwh (at the wall: x PUE), kg_co2
    (x carbon.grid_intensity), usd (GPUs x hours x carbon.gpu_hour_price; None when not priced), car_km
    and phone_charges (everyday equivalents of kg_co2 and kwh). Energy-derived values are None when
    joules is None: unknown energy is reported as unknown, never as zero.
    """
    gpu_hours = gpus * seconds / 3600.0
    price = carbon.gpu_hour_price(cfg, cfg.pricing)
    out: dict[str, float | None] = {
        "seconds": seconds,
        "gpu_hours": gpu_hours,
        "device_kwh": None,
        "kwh": None,
        "kg_co2": None,
        "usd": gpu_hours * price if price is not None else None,
        **equivalents.compute(None, None),  # car_km, phone_charges, tree_years: None while energy is unknown
    }
    if joules is not None:
        device_kwh = joules / JOULES_PER_KWH
        kwh = device_kwh * cfg.pue
        kg = kwh * carbon.grid_intensity(cfg)[0]
        out.update(device_kwh=device_kwh, kwh=kwh, kg_co2=kg)
        out.update(equivalents.compute(kwh, kg))  # car km, phone charges, tree-years (sourced factors)
    return out


def per_token(joules: float | None, tokens: int) -> float | None:
    """Joules per training token; None when either is unknown or zero."""
    if joules is None or tokens <= 0:
        return None
    return joules / tokens
