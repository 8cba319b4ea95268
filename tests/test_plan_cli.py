"""`greenrun plan` and the projection at the end of `greenrun smoke`, through the real CLI in a subprocess."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.common import run_cli


def test_a_priced_dollar_budget_prints_the_formula_a_preset_and_a_command_that_composes(tmp_path: Path):
    r = run_cli(
        "plan", "budget.dollars=50", "energy.usd_per_gpu_hour=2.5", f"run.dir={tmp_path / 'runs' / 'x'}"
    )
    assert r.returncode == 0, r.stderr
    assert "budget.dollars=50 buys 20 GPU-hours at $2.50" in r.stdout
    assert "C = 6 N D" in r.stdout and "N = sqrt(C / 120)" in r.stdout and "MFU 0.40 (assumed)" in r.stdout
    assert "nearest shipped preset" in r.stdout
    command = next(line for line in r.stdout.splitlines() if line.strip().startswith("run: "))
    args = shlex.split(command.split("run: ", 1)[1])
    assert args[:3] == ["greenrun", "train", args[2]] and args[2].startswith("model=")
    assert any(a.startswith("trainer.max_steps=") for a in args) and "energy.usd_per_gpu_hour=2.5" in args
    assert not any(a.startswith("budget.") for a in args)
    composed = run_cli(*args[1:], "--cfg", "job")
    assert composed.returncode == 0, composed.stderr
    assert f"name: {args[2].removeprefix('model=')}" in composed.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "budget.dollars, budget.gpu_hours, budget.kgco2 (got none)"),
        (("budget.dollars=5", "budget.kgco2=2"), "got budget.dollars=5 and budget.kgco2=2"),
        (
            ("budget.dollars=50",),
            "not priced (set energy.on_demand_usd_per_gpu_hour or energy.usd_per_gpu_hour)",
        ),
        (("budget.gpu_hours=10", "smoke.target=nope"), "smoke.target"),
    ],
)
def test_a_bad_budget_or_gpu_is_one_message_and_exit_2(args: tuple[str, ...], says: str):
    r = run_cli("plan", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr and "Traceback" not in r.stdout + r.stderr


def test_plan_is_in_the_usage():
    r = run_cli("plan", "--help")
    assert r.returncode == 0 and "greenrun plan budget.dollars=50" in r.stdout


def test_smoke_ends_with_the_projection_of_the_full_run(tiny: list[str], tmp_path: Path):
    # run.dir under an empty runs directory: no earlier run measured this model's MFU.
    r = run_cli("smoke", *tiny, f"run.dir={tmp_path / 'runs' / 'x'}")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "projection of the full run: 600 steps" in out and "MFU 0.40 (assumed)" in out
    assert "kWh" in out and "kg CO2e" in out
    assert "spot not priced (set energy.spot_usd_per_gpu_hour or energy.usd_per_gpu_hour)" in out
