"""Extending a finished run through the real CLI: `greenrun resume RUN trainer.max_steps=N` with
allow_config_change=true.

The steps already trained keep the lrs they had; the new ones follow schedule.lr_at over the new length
(wsd: back to the stable phase, the decay moved to the new end; cosine: the curve redrawn over N steps).
"""

import json
import shutil

import pytest

from greenrun import config
from greenrun.train import schedule
from tests.common import TINY, run_cli

FAST = ["trainer.log_interval=1", "trainer.eval_interval=1000", "preflight=false"]


def logged_lrs(run_dir):
    """metrics.jsonl's lr by optimizer step (0-based): the line for step s logs the update that made it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"] - 1: r["lr"] for r in rows if "lr" in r}


def finished_run(tiny, run_dir, *overrides):
    r = run_cli("train", *tiny, *FAST, *overrides, f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    return config.load_yaml(run_dir / "config.yaml")


def expected(cfg, steps):
    return [schedule.lr_at(s, cfg.schedule, cfg.optimizer.lr, cfg.trainer.max_steps) for s in steps]


WSD = ["schedule=wsd", "schedule.warmup_steps=2", "schedule.decay_fraction=0.25", "trainer.max_steps=12"]


@pytest.fixture(scope="module")
def finished_wsd(tmp_path_factory, cache_dir):
    """A wsd run of 12 steps (decay from step 9), with its checkpoints at steps 4, 8 and 12 kept."""
    run_dir = tmp_path_factory.mktemp("wsd") / "run"
    ckpts = ["checkpoint.interval=4", "checkpoint.keep_last=5"]
    cfg = finished_run([*TINY, f"data.cache_dir={cache_dir}"], run_dir, *WSD, *ckpts)
    assert schedule.wsd_decay_start(cfg.schedule, 12) == 9
    return run_dir, cfg


def test_extending_a_wsd_run_returns_to_the_stable_phase_and_decays_at_the_new_end(finished_wsd, tmp_path):
    source, old = finished_wsd
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    r = run_cli("resume", str(run_dir), "trainer.max_steps=24")  # not opted in: refused, nothing trained
    assert r.returncode == 2
    assert "trainer.max_steps: 12 (saved) -> 24" in r.stderr and "allow_config_change=true" in r.stderr
    assert "then schedule=wsd over 24 steps now (was 12)" in r.stderr
    assert max(logged_lrs(run_dir)) == 11

    r = run_cli("resume", str(run_dir), "trainer.max_steps=24", "allow_config_change=true")
    assert r.returncode == 0, r.stderr
    peak = old.optimizer.lr
    assert (
        f"schedule=wsd over 24 steps now (was 12): lr at step 12 goes from {peak * 0.1:.2e} to {peak:.2e} "
        "(the stable phase); the decay runs over steps 18-24"
    ) in r.stderr
    assert "decaying since step 9" in r.stderr and "(kept here: step 8, step 4)" in r.stderr

    new = config.load_yaml(run_dir / "config.yaml")
    assert new.trainer.max_steps == 24
    lrs = logged_lrs(run_dir)
    assert sorted(lrs) == list(range(24))
    assert [lrs[s] for s in range(12)] == pytest.approx(expected(old, range(12)))  # trained: unchanged
    assert [lrs[s] for s in range(12, 24)] == pytest.approx(expected(new, range(12, 24)))
    assert [lrs[s] for s in range(12, 19)] == pytest.approx([peak] * 7)  # stable again, up to the decay
    assert lrs[23] < lrs[20] < peak


def test_a_wsd_branch_from_before_the_decay_stays_stable_until_the_new_decay(finished_wsd, tmp_path):
    """What the resume suggests: copy the run without its checkpoints from the decay on, resume the copy."""
    source, old = finished_wsd
    branch = tmp_path / "branch"
    shutil.copytree(source, branch, ignore=shutil.ignore_patterns("step-00000012"))
    r = run_cli("resume", str(branch), "trainer.max_steps=24", "allow_config_change=true")
    assert r.returncode == 0, r.stderr
    assert "lr at step 8 stays" in r.stderr and "decaying since" not in r.stderr
    new = config.load_yaml(branch / "config.yaml")
    lrs = logged_lrs(branch)
    assert [lrs[s] for s in range(8)] == pytest.approx(expected(old, range(8)))
    assert [lrs[s] for s in range(8, 24)] == pytest.approx(expected(new, range(8, 24)))
    assert [lrs[s] for s in range(2, 19)] == pytest.approx([old.optimizer.lr] * 17)  # never decayed before


def test_extending_a_cosine_run_redraws_the_curve_over_the_new_length(tiny, tmp_path):
    run_dir = tmp_path / "cosine"
    old = finished_run(tiny, run_dir, "schedule.warmup_steps=2", "trainer.max_steps=10")
    r = run_cli("resume", str(run_dir), "trainer.max_steps=20", "allow_config_change=true")
    assert r.returncode == 0, r.stderr
    new = config.load_yaml(run_dir / "config.yaml")
    was, now = expected(old, [10])[0], expected(new, [10])[0]
    assert was == pytest.approx(old.optimizer.lr * 0.1) and now > 3 * was  # back up from the floor
    assert (
        f"schedule=cosine over 20 steps now (was 10): lr at step 10 goes from {was:.2e} to {now:.2e}"
        in r.stderr
    )
    lrs = logged_lrs(run_dir)
    assert [lrs[s] for s in range(10)] == pytest.approx(expected(old, range(10)))
    assert [lrs[s] for s in range(10, 20)] == pytest.approx(expected(new, range(10, 20)))
