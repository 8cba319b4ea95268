"""window: hours that wrap midnight in UTC or local time, grid readings from a file or a command (never from a
bucket's config), waiting on a fake clock, and the new keys composing from the command line."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from greenrun import config
from greenrun.core import helpdoc
from greenrun.runtime import spot, window
from greenrun.runtime.window import TrainingWindow, WindowConfig


def utc(hour: int, minute: int = 0, day: int = 5) -> float:
    return datetime(2026, 1, day, hour, minute, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeRun:
    """Stands in for subprocess.run: records each call and answers (returncode, stdout) or raises."""

    def __init__(self, answer: tuple[int, str] | BaseException) -> None:
        self.answer = answer
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, args, **kwargs):
        self.calls.append((args, kwargs))
        if isinstance(self.answer, BaseException):
            raise self.answer
        code, out = self.answer
        return subprocess.CompletedProcess(args, code, stdout=out, stderr="")


@pytest.fixture
def tz(monkeypatch):
    """Set the process's local time zone for one test (POSIX TZ strings need no tz database)."""

    def set_tz(value: str) -> None:
        monkeypatch.setenv("TZ", value)
        time.tzset()

    yield set_tz
    monkeypatch.undo()
    time.tzset()


# --- hours ---


def test_parse_hours():
    assert window.parse_hours("22-06") == (22 * 60, 6 * 60)
    assert window.parse_hours("08:30-17:45") == (510, 1065)
    assert window.parse_hours("00-24") == (0, 1440)
    for bad in ("22", "25-06", "10:61-11", "06-06", "24-02", "a-b"):
        with pytest.raises(ValueError):
            window.parse_hours(bad)


def test_hours_wrap_midnight_in_utc():
    clock = Clock(utc(21, 59))
    w = TrainingWindow(WindowConfig(hours="22-06", utc=True), clock=clock)
    is_open, why = w.open_now()
    assert not is_open and why == "outside window.hours=22-06 (UTC); it opens in 1 min"
    assert w.seconds_until_open() == 60.0
    for hour in (22, 23, 0, 3, 5):
        clock.t = utc(hour, 30, day=6 if hour < 12 else 5)
        assert w.open_now() == (True, "inside window.hours=22-06 (UTC)"), hour
    clock.t = utc(6, 0, day=6)  # the end is exclusive
    assert not w.open_now()[0] and w.seconds_until_open() == 16 * 3600.0
    assert "16h00m" in w.open_now()[1]


def test_hours_in_local_time(tz):
    tz("JST-9")  # UTC+9, no daylight saving
    clock = Clock(utc(13, 0))  # 22:00 in Tokyo
    w = TrainingWindow(WindowConfig(hours="22-06"), clock=clock)
    assert w.open_now() == (True, "inside window.hours=22-06 (local time)")
    clock.t = utc(21, 30)  # 06:30 the next morning in Tokyo
    assert not w.open_now()[0] and w.seconds_until_open() == 15.5 * 3600
    clock.t = utc(23, 0)  # 08:00 in Tokyo: closed there, open by UTC
    assert not w.open_now()[0]
    assert TrainingWindow(WindowConfig(hours="22-06", utc=True), clock=clock).open_now()[0]


def test_no_window_is_always_open():
    w = TrainingWindow(WindowConfig(), clock=Clock(0.0))
    assert not w.active and w.open_now() == (True, "no training window set") and w.seconds_until_open() == 0.0


# --- the grid ---


def test_carbon_file_reading_against_the_limit(tmp_path):
    path = tmp_path / "grid"
    path.write_text("312.5 gCO2/kWh\n")
    clock = Clock(1000.0)
    w = TrainingWindow(WindowConfig(carbon_file=str(path), max_g_per_kwh=300.0, poll_s=60.0), clock=clock)
    is_open, why = w.open_now()
    assert not is_open and why.startswith("grid at 312.5 g CO2e/kWh > window.max_g_per_kwh=300")
    assert w.seconds_until_open() == 60.0  # the grid is not predictable: check again in poll_s
    path.write_text("250")
    assert not w.open_now()[0]  # the reading is kept for poll_s
    clock.t += 60.0
    assert w.open_now() == (True, "grid at 250 <= 300 g CO2e/kWh") and w.live_kg_per_kwh() == 0.25


def test_an_unreadable_or_bad_reading_closes_the_window(tmp_path):
    cfg = WindowConfig(carbon_file=str(tmp_path / "missing"), max_g_per_kwh=300.0)
    is_open, why = TrainingWindow(cfg, clock=Clock(0.0)).open_now()
    assert not is_open and "unreadable" in why and "treated as outside the window" in why
    (tmp_path / "missing").write_text("nan")
    assert "holds no number" in TrainingWindow(cfg, clock=Clock(0.0)).open_now()[1]


def test_carbon_cmd_runs_without_a_shell_and_with_a_timeout():
    run = FakeRun((0, "180\n"))
    cfg = WindowConfig(carbon_cmd="grid-now --zone 'DE LU'", max_g_per_kwh=200.0, cmd_timeout_s=3.0)
    w = TrainingWindow(cfg, clock=Clock(0.0), run=run)
    assert w.open_now() == (True, "grid at 180 <= 200 g CO2e/kWh")
    args, kwargs = run.calls[0]
    assert args == ["grid-now", "--zone", "DE LU"] and kwargs["timeout"] == 3.0 and "shell" not in kwargs


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (subprocess.TimeoutExpired("grid-now", 3.0), "no answer within window.cmd_timeout_s=10 s"),
        (FileNotFoundError("grid-now"), "cannot run it"),
        ((2, "180"), "exit status 2"),
        ((0, "hello"), "printed no number"),
    ],
)
def test_a_failing_carbon_cmd_closes_the_window(answer, why):
    w = TrainingWindow(
        WindowConfig(carbon_cmd="grid-now", max_g_per_kwh=200.0), clock=Clock(0.0), run=FakeRun(answer)
    )
    is_open, reason = w.open_now()
    assert not is_open and why in reason


def test_a_real_command():
    cmd = f"{sys.executable} -c 'print(42)'"
    w = TrainingWindow(WindowConfig(carbon_cmd=cmd, max_g_per_kwh=100.0), clock=Clock(0.0))
    assert w.grid_g_per_kwh() == (42.0, "window.carbon_cmd")


def test_a_config_from_a_bucket_never_runs_its_command():
    run = FakeRun((0, "1"))
    w = TrainingWindow(
        WindowConfig(carbon_cmd="grid-now", max_g_per_kwh=200.0), clock=Clock(0.0), run=run, trusted=False
    )
    is_open, why = w.open_now()
    assert not is_open and "not run" in why and run.calls == []


def test_a_reading_without_a_limit_only_feeds_the_ledger():
    w = TrainingWindow(WindowConfig(carbon_cmd="grid-now"), clock=Clock(0.0), run=FakeRun((0, "90")))
    assert not w.active and w.open_now()[0] and w.live_kg_per_kwh() == 0.09


# --- waiting and exiting ---


def test_wait_until_open_on_a_fake_clock():
    clock = Clock(utc(20, 0))
    said: list[str] = []
    w = TrainingWindow(WindowConfig(hours="22-06", utc=True, poll_s=3600.0), clock=clock)
    waited = w.wait_until_open(sleep=clock.sleep, say=said.append)
    assert waited == 2 * 3600.0 and clock.t == utc(22, 0) and len(said) == 2  # polled every hour


def test_outside_exit_uses_the_preemption_exit_code():
    assert window.EXIT_OUTSIDE == spot.EXIT_PREEMPTED == 75


# --- validation and the config ---


def test_validate_names_every_bad_key():
    cfg = WindowConfig(
        hours="25-06", carbon_cmd="a 'b", carbon_file="f", max_g_per_kwh=-1, outside="sleep", poll_s=0
    )
    keys = [p.split(":")[0].split(" ")[0] for p in window.validate(cfg)]
    assert keys == [
        "window.hours",
        "window.carbon_cmd",
        "window.carbon_cmd",
        "window.max_g_per_kwh",
        "window.outside",
        "window.poll_s",
    ]
    assert "needs a grid reading" in window.validate(WindowConfig(max_g_per_kwh=300.0))[0]
    assert window.validate(WindowConfig(hours="22-06")) == []


def test_the_new_keys_compose_from_the_command_line_and_have_help():
    overrides = ["budget.kwh=2", "window.hours=22-06", "energy.region=aws:us-east-1", "energy.pricing=spot"]
    assert config.check_overrides(overrides) == []
    config.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config.conf_dir()), version_base=None):
            cfg = config.to_typed(compose(config_name="config", overrides=overrides))
    finally:
        GlobalHydra.instance().clear()
    config.validate(cfg, check_device=False)
    assert cfg.budget.kwh == 2.0 and cfg.window.hours == "22-06" and cfg.energy.region == "aws:us-east-1"
    with pytest.raises(config.ConfigError) as e:
        config.validate(
            config.apply_overrides(cfg, ["window.hours=22", "budget.action=halt"]), check_device=False
        )
    assert "window.hours" in str(e.value) and "budget.action" in str(e.value)
    docs = {k.name: k.doc for k in helpdoc.config_keys()}
    for key in (
        "budget.kwh",
        "budget.min_improvement_per_kwh",
        "window.hours",
        "window.carbon_cmd",
        "energy.region",
    ):
        assert docs[key], key
