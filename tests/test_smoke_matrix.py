"""`greenrun smoke` passes for every optimizer x curriculum combination on the tiny model (in-process: the
same smoke.run the CLI calls, without 15 interpreter start-ups)."""

from __future__ import annotations

import pytest

from greenrun import config, smoke
from greenrun.core.shipped import option_names

CURRICULUM_SETTINGS = {
    "none": [],
    "seqlen": ["curriculum.start_len=16", "curriculum.bucket=16", "curriculum.ramp_steps=4"],
    "difficulty": ["curriculum.score=rarity", "curriculum.ramp_steps=4"],
}


@pytest.mark.parametrize("curriculum", option_names("curriculum"))
@pytest.mark.parametrize("optimizer", option_names("optimizer"))
def test_smoke_passes_for_every_optimizer_and_curriculum(
    optimizer: str, curriculum: str, tiny: list[str]
) -> None:
    overrides = [
        *tiny,
        f"optimizer={optimizer}",
        f"curriculum={curriculum}",
        *CURRICULUM_SETTINGS[curriculum],
    ]
    cfg = config.apply_overrides(config.Config(), overrides)
    config.validate(
        cfg, check_device=False
    )  # as `greenrun smoke` does: GPU-only options are checked elsewhere
    result = smoke.run(cfg)
    assert result.passed, result.reason
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)
