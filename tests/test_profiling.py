"""Profiler windows: validated settings, a window the run ends inside is closed and written, no native noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from greenrun.runtime.profiling import Windows, validate
from tests.common import run_cli


def test_settings_whose_windows_overlap_are_refused():
    assert validate(0, 3) == [] and validate(500, 3) == []
    assert "profile_every=2 must be larger" in validate(2, 3)[0]
    assert "profile_every=3 must be larger" in validate(3, 3)[0]
    assert validate(10, 0) and validate(-1, 3)
    with pytest.raises(ValueError, match="profile_steps"):
        Windows(10, 0, Path("."), None)


@pytest.mark.parametrize(("steps", "every", "window"), [(5, 4, "steps-00000005-00000005.json"), (7, 3, None)])
def test_a_run_that_ends_inside_a_window_exits_cleanly_with_its_trace(tiny, tmp_path, steps, every, window):
    run_dir = tmp_path / "r"
    r = run_cli(
        "train",
        *tiny,
        f"trainer.max_steps={steps}",
        f"trainer.profile_every={every}",
        "trainer.profile_steps=2" if window is None else "trainer.profile_steps=3",
        "preflight=false",
        f"run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    traces = sorted(p.name for p in (run_dir / "profile").iterdir())
    if window is not None:
        assert traces == [window]
    else:  # windows at steps 4-5, then 7 (the last step, cut short)
        assert traces == ["steps-00000004-00000005.json", "steps-00000007-00000007.json"]
    for name in traces:
        assert "traceEvents" in json.loads((run_dir / "profile" / name).read_text())
    assert "USDT" not in r.stdout + r.stderr and "profiler_start" not in r.stdout + r.stderr


def test_overlapping_windows_are_a_config_error_before_anything_runs(tmp_path):
    r = run_cli("train", "trainer.profile_every=2", "trainer.profile_steps=3", cwd=tmp_path)
    assert r.returncode == 2 and "trainer.profile_every=2 must be larger" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
