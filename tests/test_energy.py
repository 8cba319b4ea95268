"""energy: exact accounting arithmetic, and the meter's paths through a fake pynvml (no GPU needed)."""

from __future__ import annotations

import sys
import time
import types

import pytest

from greenrun.runtime import energy, equivalents
from greenrun.runtime.energy import EnergyConfig, EnergyMeter


class FakeClock:
    """A clock the test moves by hand, so elapsed time (and so joules) is exact."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class NVMLError(Exception):
    pass


def fake_pynvml(
    monkeypatch: pytest.MonkeyPatch,
    energy_mj: list[int] | None = None,
    power_mw: int = 0,
    counter_supported: bool = True,
    fail_init: bool = False,
) -> types.ModuleType:
    """Inject a stand-in pynvml; `nvml.energy_mj[i]` is GPU i's counter, readable and settable."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.energy_mj = list(energy_mj or [0, 0, 0, 0])
    nvml.power_mw = power_mw
    nvml.fail_reads = False
    nvml.calls = []

    def init() -> None:
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def handle_by_index(i: int) -> int:
        nvml.calls.append(("index", i))
        return i

    def handle_by_uuid(uuid: str) -> int:
        nvml.calls.append(("uuid", uuid))
        return int(uuid.rsplit("-", 1)[1])

    def total_energy(h: int) -> int:
        if not counter_supported or nvml.fail_reads:
            raise NVMLError("Not Supported")
        return nvml.energy_mj[h]

    def power(h: int) -> int:
        if nvml.fail_reads:
            raise NVMLError("GPU is lost")
        return nvml.power_mw

    def shutdown() -> None:
        raise NVMLError("Uninitialized")  # close() must swallow this too

    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetHandleByIndex = handle_by_index
    nvml.nvmlDeviceGetHandleByUUID = handle_by_uuid
    nvml.nvmlDeviceGetTotalEnergyConsumption = total_energy
    nvml.nvmlDeviceGetPowerUsage = power
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


# --- accounting ---


def test_account_arithmetic_is_exact():
    cfg = EnergyConfig(pue=1.25, grid_kg_per_kwh=0.5, usd_per_gpu_hour=2.0)
    acc = energy.account(joules=7.2e6, seconds=1800.0, gpus=8, cfg=cfg)
    assert acc["device_kwh"] == 2.0  # 7.2 MJ / 3.6 MJ per kWh
    assert acc["kwh"] == 2.5  # x PUE 1.25
    assert acc["kg_co2"] == 1.25  # x 0.5 kg/kWh
    assert acc["gpu_hours"] == 4.0  # 8 GPUs x 0.5 h
    assert acc["usd"] == 8.0  # x $2
    factor = {eq.key: eq.factor for eq in equivalents.EQUIVALENTS}
    assert acc["car_km"] == 1.25 / factor["car_km"] and acc["phone_charges"] == 2.5 / factor["phone_charges"]
    assert acc["seconds"] == 1800.0


def test_account_reports_unknown_energy_as_none_and_no_price_as_no_cost():
    acc = energy.account(joules=None, seconds=3600.0, gpus=1, cfg=EnergyConfig())
    assert acc["kwh"] is None and acc["kg_co2"] is None and acc["car_km"] is None
    assert acc["usd"] is None and acc["gpu_hours"] == 1.0


def test_per_token():
    assert energy.per_token(1000.0, 250) == 4.0
    assert energy.per_token(None, 250) is None
    assert energy.per_token(1000.0, 0) is None


def test_validate():
    assert energy.validate(EnergyConfig()) == []
    problems = energy.validate(EnergyConfig(pue=0.9, grid_kg_per_kwh=-1, cpu_watts=-5))
    assert len(problems) == 3 and "energy.pue" in problems[0]


# --- which GPUs ---


def test_nvml_ids_follow_cuda_visible_devices():
    assert energy.nvml_ids([0, 1], None) == [0, 1]
    assert energy.nvml_ids([1], "2,3") == [3]
    assert energy.nvml_ids([0], "GPU-aaa, GPU-bbb") == ["GPU-aaa"]


def test_meter_uses_local_rank_through_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-x-2,GPU-x-3")
    nvml = fake_pynvml(monkeypatch, energy_mj=[0, 0, 0, 5000])
    with EnergyMeter() as meter:
        nvml.energy_mj[3] += 2000
        assert meter.read() == 2.0
    assert nvml.calls == [("uuid", "GPU-x-3")]


# --- the meter's paths ---


def test_meter_without_nvml_reports_unknown(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with EnergyMeter(EnergyConfig(), gpus=[0]) as meter:
        assert meter.available is False and meter.method == "none"
        assert meter.read() is None


def test_meter_without_nvml_uses_cpu_watts_times_elapsed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    clock = FakeClock()
    with EnergyMeter(EnergyConfig(cpu_watts=50.0), gpus=[0], clock=clock) as meter:
        clock.t += 12.5
        assert meter.available is False and meter.method == "cpu_watts"
        assert meter.read() == 625.0
        assert meter.elapsed == 12.5


def test_cpu_watts_with_the_real_clock():
    meter = EnergyMeter(EnergyConfig(cpu_watts=40.0, sensor="cpu_watts"), gpus=[])
    meter.start()
    t0 = time.monotonic()
    time.sleep(0.05)
    joules = meter.read()
    meter.close()
    assert joules == pytest.approx(40.0 * (time.monotonic() - t0), rel=0.2)


def test_counter_path_sums_gpus_and_converts_millijoules(monkeypatch):
    nvml = fake_pynvml(monkeypatch, energy_mj=[10_000_000, 20_000_000])
    with EnergyMeter(EnergyConfig(), gpus=[0, 1]) as meter:
        assert meter.available and meter.method == "counter"
        assert meter.read() == 0.0
        nvml.energy_mj[0] += 150_000  # 150 J
        nvml.energy_mj[1] += 100_500  # 100.5 J
        assert meter.read() == 250.5


def test_counter_errors_mid_run_keep_the_last_good_reading(monkeypatch):
    nvml = fake_pynvml(monkeypatch, energy_mj=[0])
    with EnergyMeter(EnergyConfig(), gpus=[0]) as meter:
        nvml.energy_mj[0] = 4000
        assert meter.read() == 4.0
        nvml.fail_reads = True
        assert meter.read() == 4.0


def test_sampling_fallback_integrates_power(monkeypatch):
    nvml = fake_pynvml(monkeypatch, power_mw=300_000, counter_supported=False)
    clock = FakeClock()
    with EnergyMeter(EnergyConfig(), gpus=[0, 1], sample_s=0.01, clock=clock) as meter:
        assert meter.available and meter.method == "sampling"
        clock.t += 10.0
        time.sleep(0.05)  # let the sampler run; constant power integrates the same either way
        assert meter.read() == pytest.approx(2 * 300.0 * 10.0)
        nvml.fail_reads = True  # sampler errors must not kill the thread or the reading
        clock.t += 1.0
        time.sleep(0.05)
        assert meter.read() == pytest.approx(2 * 300.0 * 11.0)
        assert meter._thread is not None and meter._thread.is_alive()


def test_sampling_with_the_real_clock(monkeypatch):
    fake_pynvml(monkeypatch, power_mw=100_000, counter_supported=False)
    with EnergyMeter(EnergyConfig(), gpus=[0], sample_s=0.01) as meter:
        time.sleep(0.3)
        joules, seconds = meter.read(), meter.elapsed
    assert joules == pytest.approx(100.0 * seconds, rel=0.05)


def test_nvml_init_failure_does_not_raise(monkeypatch):
    fake_pynvml(monkeypatch, fail_init=True)
    with EnergyMeter(EnergyConfig(cpu_watts=10.0), gpus=[0]) as meter:
        assert meter.available is False and meter.method == "cpu_watts"


def test_nothing_readable_at_all_falls_back_without_raising(monkeypatch):
    nvml = fake_pynvml(monkeypatch, counter_supported=False)
    nvml.fail_reads = True
    with EnergyMeter(EnergyConfig(), gpus=[0]) as meter:
        assert meter.available is False and meter.read() is None


def test_bad_visible_device_entry_does_not_raise(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    fake_pynvml(monkeypatch)
    with EnergyMeter(EnergyConfig(), gpus=[3]) as meter:  # ordinal 3 of 1 visible GPU
        assert meter.available is False and meter.read() is None


def test_close_freezes_the_reading_and_start_begins_afresh(monkeypatch):
    nvml = fake_pynvml(monkeypatch, energy_mj=[0])
    meter = EnergyMeter(EnergyConfig(), gpus=[0])
    meter.start()
    nvml.energy_mj[0] = 3000
    meter.close()
    nvml.energy_mj[0] = 9000
    assert meter.read() == 3.0
    meter.start()
    assert meter.read() == 0.0
    meter.close()


def test_read_before_start_is_a_bug():
    with pytest.raises(RuntimeError, match="before start"):
        EnergyMeter(EnergyConfig(), gpus=[]).read()


# --- energy.sensor ---


def test_sensor_none_reports_unknown_even_with_nvml_and_cpu_watts(monkeypatch):
    nvml = fake_pynvml(monkeypatch, energy_mj=[1000])
    with EnergyMeter(EnergyConfig(sensor="none", cpu_watts=50.0), gpus=[0]) as meter:
        nvml.energy_mj[0] += 5000
        assert meter.method == "none" and not meter.available and meter.read() is None
    assert nvml.calls == []  # NVML was never asked


def test_sensor_cpu_watts_ignores_a_working_nvml(monkeypatch):
    nvml = fake_pynvml(monkeypatch, energy_mj=[0])
    clock = FakeClock()
    with EnergyMeter(EnergyConfig(sensor="cpu_watts", cpu_watts=20.0), gpus=[0], clock=clock) as meter:
        nvml.energy_mj[0] += 999_000
        clock.t += 3.0
        assert meter.method == "cpu_watts" and not meter.available and meter.read() == 60.0
    assert nvml.calls == []


def test_sensor_nvml_does_not_fall_back_to_cpu_watts(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter(EnergyConfig(sensor="nvml", cpu_watts=50.0), gpus=[0]) as meter:
        assert meter.method == "none" and meter.read() is None


@pytest.mark.parametrize("sensor", ["auto", "nvml"])
def test_sensors_that_read_nvml_pick_the_counter_then_sampling(monkeypatch, sensor):
    fake_pynvml(monkeypatch, energy_mj=[0])
    with EnergyMeter(EnergyConfig(sensor=sensor, cpu_watts=50.0), gpus=[0]) as meter:
        assert meter.method == "counter" and meter.available
    fake_pynvml(monkeypatch, power_mw=100_000, counter_supported=False)
    with EnergyMeter(EnergyConfig(sensor=sensor, cpu_watts=50.0), gpus=[0], sample_s=0.01) as meter:
        assert meter.method == "sampling" and meter.available


def test_sensor_validation():
    assert energy.validate(EnergyConfig(sensor="cpu_watts", cpu_watts=30.0)) == []
    problems = energy.validate(EnergyConfig(sensor="cpu_watts"))
    assert len(problems) == 1 and "energy.cpu_watts" in problems[0]
    problems = energy.validate(EnergyConfig(sensor="nvm"))
    assert len(problems) == 1 and "energy.sensor: unknown value 'nvm' (did you mean nvml?)" in problems[0]
