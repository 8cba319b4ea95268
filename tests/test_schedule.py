import math

import pytest

from greenrun.train.schedule import (
    SCHEDULES,
    Curve,
    ScheduleConfig,
    extension_note,
    lr_at,
    milestone_steps,
    validate,
    wsd_decay_start,
)

ALL = sorted(SCHEDULES.names())


def test_every_schedule_is_tested_here():
    assert ALL == ["constant", "cosine", "linear", "step", "wsd"]


@pytest.mark.parametrize("name", ALL)
def test_warmup_reaches_peak_then_decays_to_floor(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 1.0, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    if name == "constant":
        assert lrs[100] == 1.0
    else:
        assert lrs[100] == pytest.approx(0.1)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_cosine_midpoint():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, cfg, 2.0, 100) == pytest.approx(1.0)
    assert math.isclose(lr_at(0, cfg, 2.0, 100), 2.0)


# Warmup 10, then 100 decay steps (max_steps 110) from peak 2.0 to floor 0.2 (min_lr_ratio 0.1), seen in
# warmup (0, 4, 9), where decay starts (10), at 1/4, 1/2, 3/4 of it (35, 60, 85), at the end and past it.
# cos(pi/4) = 0.70710678: cosine at progress 1/4 is 0.2 + 0.9 * 1.70710678, at 3/4 0.2 + 0.9 * 0.29289322.
# step (milestones 0.5, 0.75 of 110 = steps 55 and 83, gamma 0.3): 2.0, then 0.6, then 0.18 -> the floor.
# wsd (decay_fraction 0.2 = the last 22 steps, from 88): the peak until then, the floor at 110.
STEPS = [0, 4, 9, 10, 35, 60, 85, 110, 500]
EXPECTED = {
    "cosine": [0.2, 1.0, 2.0, 2.0, 1.73639610, 1.1, 0.46360390, 0.2, 0.2],
    "linear": [0.2, 1.0, 2.0, 2.0, 1.55, 1.1, 0.65, 0.2, 0.2],
    "step": [0.2, 1.0, 2.0, 2.0, 2.0, 0.6, 0.2, 0.2, 0.2],
    "constant": [0.2, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
    "wsd": [0.2, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.2, 0.2],
}


@pytest.mark.parametrize("name", ALL)
def test_lr_at_matches_hand_computed_values(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 2.0, 110) for s in STEPS] == pytest.approx(EXPECTED[name], abs=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_no_warmup_starts_at_peak_and_the_floor_holds(name):
    cfg = ScheduleConfig(name=name, warmup_steps=0, min_lr_ratio=0.25)
    assert lr_at(0, cfg, 4.0, 100) == 4.0
    assert lr_at(100, cfg, 4.0, 100) == (4.0 if name == "constant" else 1.0)
    assert min(lr_at(s, cfg, 4.0, 100) for s in range(200)) >= 1.0


# --- step ---------------------------------------------------------------------------------------------


def test_step_multiplies_by_gamma_at_each_milestone_down_to_the_floor():
    # Milestones at steps 30, 60, 90 of 100; peak 2.0 halves to 1.0, 0.5, then 0.25 stops at the floor 0.3.
    cfg = ScheduleConfig(
        name="step", warmup_steps=10, min_lr_ratio=0.15, milestones=(0.3, 0.6, 0.9), gamma=0.5
    )
    steps = [0, 9, 10, 29, 30, 59, 60, 89, 90, 100]
    want = [0.2, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.3]
    assert [lr_at(s, cfg, 2.0, 100) for s in steps] == pytest.approx(want, abs=1e-12)


def test_step_milestones_are_fractions_of_the_run_rounded_to_the_nearest_step():
    cfg = ScheduleConfig(name="step", milestones=(0.75, 0.25))
    assert milestone_steps(cfg, 10) == [3, 8]  # 2.5 and 7.5 round up
    assert milestone_steps(cfg, 1000) == [250, 750]
    assert lr_at(2, ScheduleConfig(name="step", warmup_steps=0, milestones=(0.25,)), 1.0, 10) == 1.0
    assert lr_at(3, ScheduleConfig(name="step", warmup_steps=0, milestones=(0.25,)), 1.0, 10) == 0.3


def test_step_without_milestones_stays_at_the_peak():
    cfg = ScheduleConfig(name="step", warmup_steps=0, milestones=())
    assert {lr_at(s, cfg, 1.0, 50) for s in range(51)} == {1.0}


# --- wsd ----------------------------------------------------------------------------------------------

# Warmup 10, max_steps 100, decay_fraction 0.4: stable to step 60, then 40 decay steps from peak 2.0 to
# floor 0.2, seen at t = 1/4, 1/2, 3/4, 1 (steps 70, 80, 90, 100). sqrt is "1-sqrt": 0.2 + 1.8 (1 - sqrt t),
# sqrt(1/2) = 0.70710678, sqrt(3/4) = 0.86602540.
WSD_STEPS = [0, 9, 10, 35, 59, 60, 70, 80, 90, 100, 150]
WSD_EXPECTED = {
    "linear": [0.2, 2.0, 2.0, 2.0, 2.0, 2.0, 1.55, 1.1, 0.65, 0.2, 0.2],
    "cosine": [0.2, 2.0, 2.0, 2.0, 2.0, 2.0, 1.73639610, 1.1, 0.46360390, 0.2, 0.2],
    "sqrt": [0.2, 2.0, 2.0, 2.0, 2.0, 2.0, 1.1, 0.72720779, 0.44115427, 0.2, 0.2],
}


@pytest.mark.parametrize("shape", sorted(WSD_EXPECTED))
def test_wsd_warmup_stable_then_decay_in_each_shape(shape):
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.4, decay_shape=shape)
    assert wsd_decay_start(cfg, 100) == 60
    assert [lr_at(s, cfg, 2.0, 100) for s in WSD_STEPS] == pytest.approx(WSD_EXPECTED[shape], abs=1e-8)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_decaying_the_whole_run_is_the_plain_schedule(shape):
    wsd = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=1.0, decay_shape=shape)
    plain = ScheduleConfig(name=shape, warmup_steps=10)
    assert [lr_at(s, wsd, 1.0, 80) for s in range(81)] == pytest.approx(
        [lr_at(s, plain, 1.0, 80) for s in range(81)]
    )


def test_wsd_decay_never_starts_inside_the_warmup_and_zero_means_no_decay():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.9)
    assert wsd_decay_start(cfg, 20) == 10  # 20 - 18 would be inside the warmup
    assert lr_at(15, cfg, 2.0, 20) == pytest.approx(1.1)
    flat = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.0)
    assert {lr_at(s, flat, 2.0, 30) for s in range(31)} == {2.0}


def test_wsd_longer_run_moves_the_decay_to_the_new_end():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2)
    assert (wsd_decay_start(cfg, 100), wsd_decay_start(cfg, 200)) == (80, 160)
    assert lr_at(100, cfg, 2.0, 100) == pytest.approx(0.2)  # the old run's end: the floor
    assert [lr_at(s, cfg, 2.0, 200) for s in (100, 159, 160, 180, 200)] == pytest.approx(
        [2.0, 2.0, 2.0, 1.1, 0.2]
    )


# --- extending a run: the one line the resume logs ----------------------------------------------------


def test_extension_note_for_cosine_says_where_the_lr_goes():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10)
    note = extension_note(Curve(cfg, 2.0, 110), Curve(cfg, 2.0, 210), 110)
    # progress at step 110 of 210 is 100/200: halfway down the new cosine, 0.2 + 0.9 = 1.1
    assert (
        note == "schedule=cosine over 210 steps now (was 110): lr at step 110 goes from 2.00e-01 to 1.10e+00"
    )


def test_extension_note_for_step_names_the_moved_milestones():
    cfg = ScheduleConfig(name="step", warmup_steps=0, milestones=(0.5,), gamma=0.5)
    note = extension_note(Curve(cfg, 1.0, 100), Curve(cfg, 1.0, 300), 100)
    assert note.endswith("lr at step 100 goes from 5.00e-01 to 1.00e+00; the milestones fall at steps 150")


def test_extension_note_for_a_decayed_wsd_run_names_the_checkpoints_before_the_decay():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2)
    note = extension_note(Curve(cfg, 2.0, 100), Curve(cfg, 2.0, 200), 100, kept_steps=[100, 90, 80, 40])
    assert note.startswith(
        "schedule=wsd over 200 steps now (was 100): lr at step 100 goes from 2.00e-01 to 2.00e+00 "
        "(the stable phase); the decay runs over steps 160-200. This run has been decaying since step 80"
    )
    assert "at or before step 80 (kept here: step 80, step 40)" in note
    assert "none is kept here" in extension_note(Curve(cfg, 2.0, 100), Curve(cfg, 2.0, 200), 100, [100])


def test_extension_note_for_wsd_still_stable_only_moves_the_decay():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2)
    note = extension_note(Curve(cfg, 2.0, 100), Curve(cfg, 2.0, 200), 50)
    assert note == (
        "schedule=wsd over 200 steps now (was 100): lr at step 50 stays 2.00e+00 (the stable phase); "
        "the decay runs over steps 160-200"
    )


def test_extension_note_is_empty_when_the_curve_is_unchanged_or_nothing_is_left():
    cfg = ScheduleConfig()
    assert extension_note(Curve(cfg, 1.0, 100), Curve(cfg, 1.0, 100), 50) == ""
    assert extension_note(Curve(cfg, 1.0, 100), Curve(cfg, 1.0, 80), 90) == ""


# --- names and validation -----------------------------------------------------------------------------


def test_unknown_schedule_fails_instead_of_falling_back_to_cosine():
    cfg = ScheduleConfig(name="cosin", warmup_steps=10)
    for step in (0, 50):  # during warmup too, so a typo cannot train for a while first
        with pytest.raises(KeyError, match="did you mean cosine"):
            lr_at(step, cfg, 1.0, 100)


def test_unknown_wsd_shape_fails_in_the_stable_phase_already():
    with pytest.raises(KeyError, match="schedule.decay_shape: .*did you mean sqrt"):
        lr_at(20, ScheduleConfig(name="wsd", warmup_steps=10, decay_shape="sqr"), 1.0, 100)


def test_validate_collects_problems_each_naming_its_key():
    bad = ScheduleConfig(
        name="cosin",
        warmup_steps=-1,
        min_lr_ratio=2.0,
        milestones=(0.5, 300),
        gamma=0.0,
        decay_fraction=1.5,
        decay_shape="1-sqrt",
    )
    problems = validate(bad)
    keys = [p.split(":")[0] for p in problems]
    assert keys == [
        "schedule.name",
        "schedule.warmup_steps",
        "schedule.min_lr_ratio",
        "schedule.milestones",
        "schedule.gamma",
        "schedule.decay_fraction",
        "schedule.decay_shape",
    ]
    assert "did you mean cosine" in problems[0]
    assert "fractions of trainer.max_steps, not step numbers" in problems[3]
    assert "choose one of linear, cosine, sqrt" in problems[6]


@pytest.mark.parametrize("name", ALL)
def test_the_defaults_of_every_schedule_validate(name):
    assert validate(ScheduleConfig(name=name)) == []
