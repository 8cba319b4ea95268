"""The run ledger: labels on every energy figure (the meter's sources, RAPL), rank sums, exact whole-run
arithmetic, checkpoint state as plain JSON, and what a resume costs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from greenrun.runtime import equivalents, rapl
from greenrun.runtime.energy import EnergyConfig, EnergyMeter, Window
from greenrun.runtime.ledger import Ledger, from_rank_sum, label, previous_process, rank_vector
from tests.test_energy import FakeClock, fake_pynvml

# 1 kWh at the device, PUE 1.25, 0.5 kg/kWh, $2 per GPU-hour: every product below is exact in binary floats.
CFG = EnergyConfig(pue=1.25, grid_kg_per_kwh=0.5, usd_per_gpu_hour=2.0)
KWH_J = 3.6e6


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def powercap(root: Path, packages: dict[str, tuple[int, int]], extra: bool = True) -> Path:
    """A fake /sys/class/powercap: zone name -> (energy_uj, max_energy_range_uj)."""
    for i, (name, (uj, span)) in enumerate(packages.items()):
        zone = root / f"intel-rapl:{i}"
        zone.mkdir(parents=True)
        (zone / "name").write_text(name + "\n")
        (zone / "energy_uj").write_text(f"{uj}\n")
        (zone / "max_energy_range_uj").write_text(f"{span}\n")
        if extra:  # a sub-zone inside the package: never counted twice
            sub = root / f"intel-rapl:{i}:0"
            sub.mkdir()
            (sub / "name").write_text("core\n")
            (sub / "energy_uj").write_text("999999999\n")
            (sub / "max_energy_range_uj").write_text("1000000000\n")
    return root


def set_uj(root: Path, i: int, uj: int) -> None:
    (root / f"intel-rapl:{i}" / "energy_uj").write_text(f"{uj}\n")


# --- measurement labels ---


def test_every_meter_method_has_its_label(monkeypatch):
    fake_pynvml(monkeypatch, energy_mj=[0])
    with EnergyMeter(EnergyConfig(), gpus=[0]) as m:
        assert m.method == "counter" and m.source == "measured"
    fake_pynvml(monkeypatch, power_mw=100_000, counter_supported=False)
    with EnergyMeter(EnergyConfig(), gpus=[0], sample_s=0.01) as m:
        assert m.method == "sampling" and m.source == "sampled"
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter(EnergyConfig(cpu_watts=10.0), gpus=[0]) as m:
        assert m.source == "estimated"
    with EnergyMeter(EnergyConfig(), gpus=[0]) as m:
        assert m.source == "unknown" and m.window().joules is None


def test_window_gives_the_energy_and_mean_power_since_the_last_window(monkeypatch):
    nvml = fake_pynvml(monkeypatch, energy_mj=[0, 0])
    clock = FakeClock()
    with EnergyMeter(EnergyConfig(), gpus=[0, 1], clock=clock) as m:
        nvml.energy_mj[0] += 300_000  # 300 J
        nvml.energy_mj[1] += 100_000
        clock.t += 2.0
        w = m.window()
        assert (w.joules, w.seconds, w.source, w.power_w) == (400.0, 2.0, "measured", 200.0)
        nvml.energy_mj[0] += 50_000
        clock.t += 1.0
        assert m.window() == Window(50.0, 1.0, "measured")
        assert m.read() == 450.0  # the cumulative reading is untouched


def test_rapl_measures_a_cpu_run_across_a_wrap(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    root = powercap(
        tmp_path, {"package-0": (900_000_000, 1_000_000_000), "package-1": (5_000_000, 1_000_000_000)}
    )
    with EnergyMeter(EnergyConfig(cpu_watts=99.0), gpus=[], rapl_root=root) as m:
        assert m.method == "rapl" and m.source == "measured"  # measured wins over the stated watts
        set_uj(root, 0, 50_000_000)  # wrapped: 100 J to the top, then 50 J
        set_uj(root, 1, 15_000_000)  # 10 J
        assert m.read() == pytest.approx(160.0)
        assert m.window().joules == pytest.approx(160.0)


def test_rapl_reports_each_local_process_its_share(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    root = powercap(tmp_path, {"package-0": (0, 10**12)}, extra=False)
    with EnergyMeter(EnergyConfig(), gpus=[], rapl_root=root) as m:
        set_uj(root, 0, 40_000_000)
        assert m.read() == 10.0  # four ranks on this host sum to the host's 40 J


def test_unreadable_rapl_is_not_measured_and_falls_to_the_estimate(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter(EnergyConfig(), gpus=[], rapl_root=tmp_path / "none") as m:
        assert m.method == "none" and m.source == "unknown" and m.read() is None
    root = powercap(tmp_path / "psys", {"psys": (0, 10**9)}, extra=False)  # no package zone
    with EnergyMeter(EnergyConfig(cpu_watts=20.0), gpus=[], rapl_root=root) as m:
        assert m.method == "cpu_watts" and m.source == "estimated"


def test_rapl_read_errors_keep_the_last_good_reading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    root = powercap(tmp_path, {"package-0": (0, 10**12)}, extra=False)
    with EnergyMeter(EnergyConfig(), gpus=[], rapl_root=root) as m:
        set_uj(root, 0, 7_000_000)
        assert m.read() == 7.0
        (root / "intel-rapl:0" / "energy_uj").write_text("garbage")
        assert m.read() == 7.0


def test_a_gpu_run_never_counts_rapl_as_its_gpus(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    root = powercap(tmp_path, {"package-0": (0, 10**12)}, extra=False)
    with EnergyMeter(EnergyConfig(), gpus=[0], rapl_root=root) as m:
        assert m.method == "none" and m.read() is None


def test_rapl_itself_handles_a_wrap_per_zone(tmp_path):
    root = powercap(tmp_path, {"package-0": (990, 1000)}, extra=False)
    counters = rapl.Rapl(root)
    set_uj(root, 0, 10)
    assert counters.read() == pytest.approx(20e-6)


# --- labels and rank sums ---


def test_mixed_labels_read_in_a_fixed_order():
    assert label(["estimated", "measured"]) == "measured+estimated"
    assert label(["measured+sampled", "measured"]) == "measured+sampled"
    assert label([]) == "unknown" and label([""]) == "unknown"
    assert label(["measured", "bogus"]) == "measured+unknown"


def test_rank_sum_adds_joules_and_any_unknown_rank_makes_the_window_unknown():
    ranks = [Window(100.0, 2.0, "measured"), Window(50.0, 2.1, "sampled")]
    summed = [sum(col) for col in zip(*(rank_vector(w) for w in ranks), strict=True)]  # all_reduce(SUM)
    assert from_rank_sum(summed, 2.0) == Window(150.0, 2.0, "measured+sampled")
    ranks.append(Window(None, 2.0, "unknown"))
    summed = [sum(col) for col in zip(*(rank_vector(w) for w in ranks), strict=True)]
    assert math.isnan(summed[0])
    assert from_rank_sum(summed, 2.0) == Window(None, 2.0, "unknown")


# --- the ledger's arithmetic ---


def test_one_window_exactly():
    led = Ledger(CFG, gpus=4)
    led.add(KWH_J, 1800.0, 1000, "measured")
    snap = led.snapshot()
    assert snap["kwh"] == 1.25  # 1 kWh x PUE
    assert snap["kgco2e"] == 0.625  # x 0.5 kg/kWh
    assert snap["gpu_hours"] == 2.0  # 4 GPUs x 0.5 h
    assert snap["usd"] == 4.0  # x $2
    assert snap["tokens_per_kwh"] == 800.0
    assert snap["power_w"] == 2000.0  # 3.6 MJ over 1800 s, every GPU together, before PUE
    assert snap["energy_source"] == "measured"
    assert snap["train_s"] == 1800.0


def test_windows_accumulate_and_a_live_intensity_counts_per_window():
    led = Ledger(CFG, gpus=1)
    led.add(KWH_J, 3600.0, 10, "measured")
    led.add(KWH_J, 3600.0, 10, "measured", kg_per_kwh=0.1)  # window.carbon_cmd read 100 g/kWh
    assert led.kwh == 2.5 and led.kgco2e == 0.625 + 0.125 and led.usd == 4.0
    assert led.totals.tokens == 20


def test_unknown_energy_is_unknown_not_zero_and_partial_energy_says_so():
    led = Ledger(CFG, gpus=1)
    led.add(None, 60.0, 5, "measured")  # no joules: unknown whatever the caller called it
    snap = led.snapshot()
    assert snap["kwh"] is None and snap["kgco2e"] is None and snap["tokens_per_kwh"] is None
    assert snap["energy_source"] == "unknown" and snap["power_w"] is None and snap["gpu_hours"] > 0
    led.add(KWH_J, 60.0, 5, "estimated")
    assert led.kwh == 1.25 and led.snapshot()["energy_source"] == "estimated+unknown"
    assert led.tokens_per_kwh == 4.0  # only the tokens of the window whose energy is known
    assert led.summary()["unmetered_s"] == 60.0
    led.add(-5.0, 1.0, 0, "measured")  # a counter that ran backwards is no reading
    assert led.kwh == 1.25
    with pytest.raises(ValueError, match="labelled"):
        led.add(1.0, 1.0, 0, "unknown")


def test_no_price_means_no_dollars_and_a_cpu_run_rents_no_gpu_hours():
    led = Ledger(EnergyConfig(), gpus=2)
    led.add(KWH_J, 3600.0, 1, "measured")
    assert led.usd is None and led.snapshot()["usd"] is None and led.summary()["unpriced_gpu_hours"] is None
    cpu = Ledger(CFG, gpus=0)
    cpu.add(KWH_J, 3600.0, 1, "measured")
    assert cpu.usd is None and cpu.snapshot()["gpu_hours"] == 0.0


def test_pricing_picks_spot_or_on_demand():
    spot = EnergyConfig(pricing="spot", spot_usd_per_gpu_hour=1.0, on_demand_usd_per_gpu_hour=4.0)
    led = Ledger(spot, gpus=2)
    led.add(None, 3600.0, 0, "unknown")
    assert led.usd == 2.0 and led.summary()["usd_per_gpu_hour"] == 1.0


# --- checkpoints ---


def test_state_is_plain_json_and_round_trips():
    led = Ledger(CFG, gpus=2)
    led.add(KWH_J, 100.0, 7, "measured")
    led.add(None, 10.0, 1, "unknown")
    state = json.loads(json.dumps(led.state_dict()))  # what the checkpoint's JSON metadata holds
    again = Ledger(CFG, gpus=2)
    again.load_state_dict(state)
    assert again.state_dict() == led.state_dict()
    assert {k: v for k, v in again.snapshot().items() if k not in ("power_w", "time")} == {
        k: v for k, v in led.snapshot().items() if k not in ("power_w", "time")
    }


def test_a_checkpoint_from_before_the_ledger_counts_its_time_as_unknown():
    led = Ledger(CFG, gpus=1)
    led.load_state_dict({}, seconds_before=3600.0, tokens_before=100)
    assert led.totals.train_s == 3600.0 and led.totals.tokens == 100 and led.kwh is None
    led.add(KWH_J, 3600.0, 100, "measured")
    assert led.snapshot()["energy_source"] == "measured+unknown" and led.summary()["unmetered_s"] == 3600.0


def test_bad_figures_in_a_checkpoint_are_dropped_and_said():
    led = Ledger(CFG, gpus=1)
    led.load_state_dict({"kwh": "lots", "train_s": float("nan"), "tokens": 5, "sources": "measured"})
    assert led.totals.kwh == 0.0 and led.totals.train_s == 0.0 and led.totals.tokens == 5
    assert led.totals.sources == "measured+unknown"


# --- resumes: lost work and waiting ---


def killed_run(clock_t: float) -> tuple[dict, dict, list[dict]]:
    """A process that checkpointed at step 100 (2 kWh device energy so far), then trained to step 130, logged
    step 120 and was preempted at 130. Returns (checkpoint state, last record, every record it wrote)."""
    led = Ledger(CFG, gpus=2, wall_clock=lambda: clock_t)
    led.add(2 * KWH_J, 1000.0, 100_000, "measured")
    state = json.loads(json.dumps(led.state_dict()))
    led.add(KWH_J, 200.0, 20_000, "measured")
    record = {"step": 120, "tokens": 120_000, **led.snapshot()}
    return state, record, [{"step": 100, **led.snapshot()}, record, {"event": "preempt", "step": 130}]


def test_previous_process_finds_the_furthest_step_and_the_last_ledger_record():
    _, record, records = killed_run(5000.0)
    assert previous_process(records, 100) == (30, record)
    assert previous_process([], 100) == (0, None)


def test_a_resume_counts_the_lost_work_in_the_totals_and_the_wait():
    state, record, records = killed_run(clock_t=5000.0)
    steps_lost, last = previous_process(records, 100)
    led = Ledger(CFG, gpus=2)
    led.load_state_dict(state)
    event = led.on_resume(
        100, checkpoint_wall_time=4000.0, resumed_at=5600.0, steps_lost=steps_lost, last_record=last
    )
    assert event == {
        "event": "resume",
        "step": 100,
        "lost_steps": 30,
        "lost_s": 200.0,
        "wait_s": 600.0,  # from the last record's time (later than the commit) to this start
        "lost_kwh": 1.25,
    }
    # The lost work was spent: it stays in the whole run's figures.
    assert led.kwh == 3 * 1.25 and led.totals.train_s == 1200.0 and led.totals.tokens == 100_000
    pre = led.summary()["preemption"]
    assert pre["resumes"] == 1 and pre["lost_steps"] == 30 and pre["lost_kwh"] == 1.25
    assert pre["lost_usd"] == pytest.approx(2 * 200 / 3600 * 2.0) and pre["wait_s"] == 600.0
    # Kept tokens over every kWh spent: the recomputed work lowers it.
    assert led.tokens_per_kwh == 100_000 / 3.75


def test_a_resume_without_a_record_counts_what_it_can():
    state, _, _ = killed_run(5000.0)
    led = Ledger(CFG, gpus=2)
    led.load_state_dict(state)
    event = led.on_resume(100, checkpoint_wall_time=None, resumed_at=9.0, steps_lost=5)
    assert event["lost_s"] is None and event["wait_s"] is None
    pre = led.summary()["preemption"]
    assert pre["lost_unknown"] == 1 and pre["wait_unknown"] == 1 and pre["lost_steps"] == 5
    assert led.snapshot()["energy_source"] == "measured+unknown"  # the lost work's energy is missing
    event = led.on_resume(100, checkpoint_wall_time=4000.0, resumed_at=4100.0, steps_lost=0)
    assert event["wait_s"] == 100.0  # an emergency checkpoint: nothing lost, the wait from its commit


def test_mixed_sources_across_resumes_are_reported_honestly():
    led = Ledger(CFG, gpus=1)
    led.add(KWH_J, 10.0, 1, "measured")
    state = led.state_dict()
    led = Ledger(CFG, gpus=1)  # resumed on a machine without an energy counter
    led.load_state_dict(state)
    led.on_resume(1, 0.0, 1.0, 0)
    led.add(KWH_J, 10.0, 1, "estimated")
    assert led.summary()["energy_source"] == "measured+estimated"


def test_two_kills_in_a_row_before_a_new_checkpoint_count_both():
    """A dies past checkpoint 100 at 130; B resumes from 100, dies at 120 without a checkpoint; C resumes."""
    state, a_record, a_records = killed_run(5000.0)
    b = Ledger(CFG, gpus=2, wall_clock=lambda: 7000.0)
    b.load_state_dict(state)
    b.on_resume(100, 4000.0, 5600.0, *previous_process(a_records, 100))
    b.add(KWH_J, 100.0, 20_000, "measured")
    b_records = [{"step": 120, **b.snapshot()}]
    c = Ledger(CFG, gpus=2)
    c.load_state_dict(state)
    event = c.on_resume(100, 4000.0, 7300.0, *previous_process(b_records, 100))
    # Since checkpoint 100: A's 30 steps (200 s) and B's 20 (100 s) lost, A's 600 s and B's 300 s waited.
    assert event["lost_steps"] == 50 and event["lost_s"] == 300.0 and event["wait_s"] == 900.0
    pre = c.summary()["preemption"]
    assert pre["resumes"] == 2 and pre["lost_steps"] == 50 and pre["wait_s"] == 900.0
    assert c.kwh == 4 * 1.25 and c.totals.train_s == 1300.0
    assert c.summary()["energy_source"] == "measured"


def test_summary_is_the_whole_run_with_its_sources():
    led = Ledger(EnergyConfig(pue=1.0, region="eu"), gpus=1)
    led.add(KWH_J, 3600.0, 50, "sampled")
    s = led.summary()
    assert s["kwh"] == 1.0 and s["kgco2e"] == 0.23 and s["energy_source"] == "sampled"
    assert (
        s["grid_source"].startswith("energy.region=eu")
        and s["car_km"] == equivalents.compute(1.0, 0.23)["car_km"]
    )
    assert json.loads(json.dumps(s)) == s
