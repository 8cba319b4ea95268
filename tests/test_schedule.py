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


def test_pure_function_of_step():
    cfg = ScheduleConfig()
    assert [lr_at(s, cfg, 3e-4, 500) for s in range(0, 500, 7)] == [
        lr_at(s, cfg, 3e-4, 500) for s in range(0, 500, 7)
    ]


def test_validate_collects_problems():
    problems = validate(ScheduleConfig(name="cosin", warmup_steps=-1, min_lr_ratio=2.0))
    assert len(problems) == 3
    assert "did you mean cosine" in problems[0]
