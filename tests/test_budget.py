"""budget: warnings at warn_at (rate-limited on a fake clock), stops, unknown figures, the improvement-per-kWh
floor, state across a resume, and upload health."""

from __future__ import annotations

import json

from greenrun.runtime import budget
from greenrun.runtime.budget import BudgetConfig, BudgetWatch, UploadHealth


def totals(kwh=None, kgco2e=None, usd=None, gpu_hours=0.0):
    return {"kwh": kwh, "kgco2e": kgco2e, "usd": usd, "gpu_hours": gpu_hours}


def test_no_budget_no_message():
    watch = BudgetWatch(BudgetConfig())
    assert watch.check(totals(kwh=1e9, usd=1e9, gpu_hours=1e9), now=0.0) == budget.Decision()


def test_warn_at_the_fraction_then_rate_limited_then_at_once_when_spent():
    watch = BudgetWatch(BudgetConfig(kwh=10.0, warn_at=0.8, warn_every_s=600.0))
    assert watch.check(totals(kwh=7.9), now=0.0).messages == []
    first = watch.check(totals(kwh=8.0), now=10.0)
    assert first.messages == ["budget.kwh: 8 of 10 kWh spent (80%)"] and not first.stop
    assert watch.check(totals(kwh=8.5), now=100.0).messages == []  # within warn_every_s
    assert watch.check(totals(kwh=8.6), now=610.0).messages == ["budget.kwh: 8.6 of 10 kWh spent (86%)"]
    spent = watch.check(totals(kwh=10.0), now=620.0)  # worse: warns at once, but warn does not stop
    assert not spent.stop and spent.messages[0].startswith("budget.kwh: 10 of 10 kWh spent (100%)")
    assert "budget.action=stop" in spent.messages[0]
    assert watch.check(totals(kwh=10.5), now=700.0).messages == []


def test_warn_every_s_zero_warns_only_when_the_level_changes():
    watch = BudgetWatch(BudgetConfig(gpu_hours=100.0, warn_every_s=0.0))
    assert len(watch.check(totals(gpu_hours=90.0), now=0.0).messages) == 1
    assert watch.check(totals(gpu_hours=95.0), now=1e9).messages == []


def test_a_spent_budget_stops_with_action_stop():
    watch = BudgetWatch(BudgetConfig(dollars=50.0, kgco2=5.0, action="stop"))
    d = watch.check(totals(usd=49.0, kgco2e=5.5), now=0.0)
    assert d.stop and d.reason.startswith("budget.kgco2: 5.5 of 5 kg CO2e spent")
    assert any(m.startswith("budget.dollars: 49 of 50 $ spent (98%)") for m in d.messages)


def test_a_budget_on_an_unknown_figure_says_so_once():
    watch = BudgetWatch(BudgetConfig(dollars=10.0, kwh=1.0, action="stop"))
    d = watch.check(totals(), now=0.0)
    assert not d.stop and len(d.messages) == 2
    assert "budget.kwh=1 cannot be checked" in d.messages[0] and "energy.cpu_watts" in d.messages[0]
    assert "budget.dollars=10 cannot be checked" in d.messages[1] and "usd_per_gpu_hour" in d.messages[1]
    assert watch.check(totals(), now=1e6).messages == []
    assert watch.check(totals(kwh=2.0), now=1e6).stop  # once known, it counts


def test_improvement_per_kwh_over_the_window_stops_below_the_floor():
    watch = BudgetWatch(BudgetConfig(min_improvement_per_kwh=0.1, improvement_evals=2))
    assert not watch.on_eval(3.0, 0.0).stop
    assert not watch.on_eval(2.0, 1.0).stop  # not a full window yet
    assert not watch.on_eval(1.5, 2.0).stop  # 1.5 nats over 2 kWh
    assert not watch.on_eval(1.45, 3.0).stop  # 0.55 over 2 kWh = 0.275/kWh
    d = watch.on_eval(1.4, 4.0)  # 0.1 over 2 kWh = 0.05/kWh < 0.1
    assert d.stop and "0.05 per kWh < budget.min_improvement_per_kwh=0.1" in d.reason


def test_improvement_floor_judges_nothing_without_energy_or_during_a_ramp():
    watch = BudgetWatch(BudgetConfig(min_improvement_per_kwh=10.0, improvement_evals=1))
    assert not watch.on_eval(3.0, None).stop and watch.evals == []
    watch.on_eval(3.0, 1.0)
    assert not watch.on_eval(3.0, 1.0).stop  # no energy spent in between: nothing to divide by
    assert not watch.on_eval(9.0, 2.0, ramping=True).stop and watch.evals == []
    assert not BudgetWatch(BudgetConfig()).on_eval(1.0, 1.0).stop  # off by default


def test_state_round_trips_through_json():
    watch = BudgetWatch(BudgetConfig(kwh=10.0, min_improvement_per_kwh=1.0, warn_every_s=600.0))
    watch.check(totals(kwh=9.0), now=50.0)
    watch.on_eval(2.0, 1.0)
    again = BudgetWatch(watch.cfg)
    again.load_state_dict(json.loads(json.dumps(watch.state_dict())))
    assert again.state_dict() == watch.state_dict()
    assert again.check(totals(kwh=9.1), now=100.0).messages == []  # the warning fired before the resume


def test_validate_names_every_bad_key():
    problems = budget.validate(
        BudgetConfig(kwh=-1, warn_at=1.5, action="halt", improvement_evals=0, warn_every_s=-2)
    )
    assert [p.split(":")[0] for p in problems] == [
        "budget.kwh",
        "budget.warn_every_s",
        "budget.warn_at",
        "budget.action",
        "budget.improvement_evals",
    ]
    assert budget.validate(BudgetConfig()) == []


def test_upload_health_warns_after_the_limit_and_every_limit_failures_after():
    health = UploadHealth(max_failed=2)
    assert health.observe(False).messages == []
    second = health.observe(False)
    assert not second.stop and "2 checkpoint uploads failed in a row" in second.messages[0]
    assert "keeps its last verified one" in second.messages[0]
    assert health.observe(False).messages == []
    assert len(health.observe(False).messages) == 1  # the 4th
    assert health.observe(True).messages == ["checkpoint uploads succeed again"]
    assert health.failed == 0 and health.observe(False).messages == []


def test_upload_health_stops_and_its_state_survives_a_resume():
    health = UploadHealth(max_failed=3, action="stop")
    health.observe(False)
    health.observe(False)
    again = UploadHealth(3, "stop")
    again.load_state_dict(json.loads(json.dumps(health.state_dict())))
    d = again.observe(False)
    assert d.stop and d.reason.startswith("3 checkpoint uploads failed in a row")
    assert not UploadHealth(0).observe(False).messages  # 0 = never act


def test_upload_problems():
    assert budget.upload_problems(3, "warn") == []
    problems = budget.upload_problems(-1, "halt")
    assert problems[0].startswith("storage.on_failed_uploads: unknown value 'halt'")
    assert problems[1].startswith("storage.max_failed_uploads: must be >= 0")
