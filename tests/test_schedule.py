import math

import pytest

from greenrun.train.schedule import ScheduleConfig, lr_at, validate


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
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
STEPS = [0, 4, 9, 10, 35, 60, 85, 110, 500]
EXPECTED = {
    "cosine": [0.2, 1.0, 2.0, 2.0, 1.73639610, 1.1, 0.46360390, 0.2, 0.2],
    "linear": [0.2, 1.0, 2.0, 2.0, 1.55, 1.1, 0.65, 0.2, 0.2],
    "constant": [0.2, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lr_at_matches_hand_computed_values(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 2.0, 110) for s in STEPS] == pytest.approx(EXPECTED[name], abs=1e-8)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_warmup_starts_at_peak_and_the_floor_holds(name):
    cfg = ScheduleConfig(name=name, warmup_steps=0, min_lr_ratio=0.25)
    assert lr_at(0, cfg, 4.0, 100) == 4.0
    assert lr_at(100, cfg, 4.0, 100) == (4.0 if name == "constant" else 1.0)
    assert min(lr_at(s, cfg, 4.0, 100) for s in range(200)) >= 1.0


def test_unknown_schedule_fails_instead_of_falling_back_to_cosine():
    cfg = ScheduleConfig(name="cosin", warmup_steps=10)
    for step in (0, 50):  # during warmup too, so a typo cannot train for a while first
        with pytest.raises(KeyError, match="did you mean cosine"):
            lr_at(step, cfg, 1.0, 100)


def test_validate_collects_problems():
    problems = validate(ScheduleConfig(name="cosin", warmup_steps=-1, min_lr_ratio=2.0))
    assert len(problems) == 3
    assert "did you mean cosine" in problems[0]
