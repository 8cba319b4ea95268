"""Early stopping: decisions from scripted losses, the options as registered, and whole runs that stop early."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from safetensors.torch import load_file

from greenrun import config, job
from greenrun.ckpt import checkpoint
from greenrun.core.shipped import load_option, option_names
from greenrun.train import early_stopping
from greenrun.train.early_stopping import STOPPERS, EarlyStopping, EarlyStoppingConfig, Never
from greenrun.trainer import Trainer
from tests.common import run_cli

# --- decisions from scripted validation losses ----------------------------------------------------------


def decide(losses, ramping=None, **cfg):
    stopper = EarlyStopping(EarlyStoppingConfig(name="on", **cfg))
    ramping = ramping or [False] * len(losses)
    return [stopper.update(v, 10 * (i + 1), r) for i, (v, r) in enumerate(zip(losses, ramping, strict=True))]


def first_stop(decisions):
    return next((i for i, d in enumerate(decisions) if d.stop), None)


def test_patience_counts_evaluations_in_a_row_without_improvement():
    losses = [3.0, 2.0, 2.5, 1.9, 2.4, 2.3, 2.2, 2.1]
    decisions = decide(losses, patience=3)
    assert [d.improved for d in decisions][:4] == [True, True, False, True]
    assert [d.bad_evals for d in decisions] == [0, 0, 1, 0, 1, 2, 3, 4]
    assert first_stop(decisions) == 6  # the improvement at 1.9 reset the count
    assert decisions[6].best == 1.9 and decisions[6].best_step == 40
    assert (
        "not improved in 3 evaluations" in decisions[6].reason
        and "best 1.9000 at step 40" in decisions[6].reason
    )
    assert first_stop(decide(losses, patience=5)) is None


def test_an_improvement_no_larger_than_min_delta_does_not_count():
    losses = [3.0, 2.95, 2.9, 2.85, 2.8]
    assert first_stop(decide(losses, patience=2)) is None  # every drop counts without min_delta
    decisions = decide(losses, patience=2, min_delta=0.12)
    assert [d.improved for d in decisions][:3] == [True, False, False]
    assert first_stop(decisions) == 2 and "by more than 0.12" in decisions[2].reason


def test_smoothing_compares_the_exponential_average():
    losses = [2.0, 1.0, 1.2, 1.1]
    assert first_stop(decide(losses, patience=2)) == 3  # raw: 1.2 and 1.1 do not beat 1.0
    decisions = decide(losses, patience=2, smoothing=0.5)
    assert [d.value for d in decisions] == [2.0, 1.5, 1.35, 1.225]  # s = 0.5 s + 0.5 loss
    assert all(d.improved for d in decisions) and first_stop(decisions) is None
    assert "smoothed validation loss" in decide([1.0, 2.0], patience=1, smoothing=0.5)[1].reason


def test_warmup_evals_never_count_against_patience():
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert first_stop(decide(losses, patience=1)) == 1
    assert first_stop(decide(losses, patience=1, warmup_evals=2)) == 2
    assert first_stop(decide(losses, patience=1, warmup_evals=3)) == 3


def test_it_never_fires_while_the_curriculum_ramps():
    worse = [float(v) for v in range(1, 21)]  # a loss that rises all along, as harder data comes in
    decisions = decide(worse, ramping=[True] * 20, patience=1)
    assert first_stop(decisions) is None
    assert all(not d.improved and d.bad_evals == 0 and d.best is None for d in decisions)
    # The ramp ends: its evaluations saw other data, so the comparison starts afresh at the first one after it.
    decisions = decide([5.0, 6.0, 7.0, 8.0, 9.0], ramping=[True, True, False, False, False], patience=2)
    assert decisions[2].improved and decisions[2].best == 7.0 and decisions[2].best_step == 30
    assert first_stop(decisions) == 4


def test_a_ramp_later_in_the_run_forgets_the_best_before_it():
    decisions = decide([1.0, 2.0, 3.0, 2.5, 2.6], ramping=[False, True, False, False, False], patience=2)
    assert decisions[2].improved and decisions[2].best == 3.0  # 1.0 came before the ramp: not comparable
    assert decisions[3].improved and first_stop(decisions) is None


def test_a_non_finite_validation_loss_is_no_improvement_and_stays_out_of_the_smoothing():
    decisions = decide([2.0, float("nan"), 1.0], patience=2, smoothing=0.5)
    assert not decisions[1].improved and decisions[1].bad_evals == 1
    assert decisions[2].value == 1.5 and decisions[2].improved


def test_counters_resume_exactly_through_a_checkpoint_round_trip(tmp_path):
    rng = random.Random(0)
    losses = [3.0 - 0.05 * min(i, 25) + rng.uniform(-0.2, 0.2) for i in range(40)]  # falls, then flat
    ramping = [i < 6 or 20 <= i < 23 for i in range(40)]
    cfg = EarlyStoppingConfig(name="on", patience=4, min_delta=0.01, smoothing=0.6, warmup_evals=2)
    straight = EarlyStopping(cfg)
    want = [straight.update(v, i, r) for i, (v, r) in enumerate(zip(losses, ramping, strict=True))]
    assert any(d.stop for d in want) and any(d.improved for d in want[25:])  # the script exercises it all
    for cut in (3, 7, 21, 30):
        first = EarlyStopping(cfg)
        got = [first.update(losses[i], i, ramping[i]) for i in range(cut)]
        torch.save({"early_stopping": first.state_dict()}, tmp_path / "trainer.pt")
        second = EarlyStopping(cfg)
        second.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True)["early_stopping"])
        assert second.last == got[-1]
        got += [second.update(losses[i], i, ramping[i]) for i in range(cut, 40)]
        assert got == want, f"cut at {cut}"


def test_none_never_stops_and_keeps_no_state():
    never = Never(EarlyStoppingConfig())
    assert not any(never.update(float(v), v, False).stop for v in range(100))
    assert never.state_dict() == {} and never.best_step is None


# --- the options, their YAML and their validation --------------------------------------------------------


def test_yaml_options_are_the_registered_ones_and_name_themselves():
    assert STOPPERS.key == "early_stopping.name"
    assert option_names("early_stopping") == sorted(STOPPERS.names()) == ["none", "on"]
    for name in option_names("early_stopping"):
        assert load_option("early_stopping", name) == {"name": name}  # `on` quoted: not YAML's true
        assert early_stopping.validate(EarlyStoppingConfig(name=name)) == []
    assert isinstance(early_stopping.build(EarlyStoppingConfig(name="on")), EarlyStopping)
    assert config.Config().early_stopping.name == "none"


def test_validation_reports_every_bad_value_and_the_closest_name():
    bad = EarlyStoppingConfig(name="of", patience=0, min_delta=-1.0, smoothing=1.0, warmup_evals=-1)
    problems = early_stopping.validate(bad)
    assert len(problems) == 5
    assert problems[0].startswith("early_stopping.name: unknown value 'of'") and "none, on" in problems[0]
    with pytest.raises(config.ConfigError, match="early_stopping.patience: must be >= 1"):
        config.validate(config.apply_overrides(config.Config(), ["early_stopping.patience=0"]))
    with pytest.raises(KeyError, match="did you mean"):
        early_stopping.build(EarlyStoppingConfig(name="onn"))


def test_the_group_composes_from_the_command_line():
    assert config.check_overrides(["early_stopping=on", "early_stopping.patience=5"]) == []
    assert "early_stopping" in config.check_overrides(["early_stopping=off"])[0]
    cfg = config.apply_overrides(config.Config(), ["early_stopping=on", "early_stopping.smoothing=0.9"])
    assert cfg.early_stopping == EarlyStoppingConfig(name="on", smoothing=0.9)
    assert not config.is_math_key("early_stopping.patience")  # when to stop, not what a step computes


# --- whole runs ------------------------------------------------------------------------------------------

RUN = ["trainer.max_steps=40", "trainer.eval_interval=5", "trainer.log_interval=5", "preflight=false"]


def test_a_real_run_stops_early_commits_says_why_and_exits_0(tiny, tmp_path):
    run_dir = tmp_path / "run"
    # Nothing beats the first evaluation by 10 nats, so it stops two evaluations later, at step 15.
    stop = ["early_stopping=on", "early_stopping.min_delta=10", "early_stopping.patience=2"]
    r = run_cli("train", *tiny, *RUN, *stop, f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 15
    assert summary["early_stop"]["best_step"] == 5 and summary["early_stop"]["bad_evals"] == 2
    assert "not improved by more than 10 in 2 evaluations" in summary["early_stop"]["reason"]
    assert "stopped early at step 15: the validation loss has not improved" in r.stderr + r.stdout
    newest = checkpoint.latest_valid(run_dir / "checkpoints")
    assert newest.name == "step-00000015"
    assert checkpoint.read_manifest(newest)["early_stop"] == summary["early_stop"]["reason"]
    # Resumed as it is, it stays stopped; told to stop no more, it trains on to max_steps.
    r = run_cli("resume", str(run_dir))
    assert r.returncode == 0 and "already stopped early at step 15" in r.stderr + r.stdout, r.stderr
    assert checkpoint.latest_valid(run_dir / "checkpoints").name == "step-00000015"
    r = run_cli("resume", str(run_dir), "early_stopping=none")
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 40


# Scripted validation losses by step (the real ones of a tiny run only fall): best at step 10.
SCRIPT = {0: 5.0, 5: 3.0, 10: 2.0, 15: 2.4, 20: 2.3, 25: 2.6, 30: 2.7, 35: 2.8, 40: 2.9}


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(Trainer, "evaluate", lambda self: SCRIPT[self.step])


def _job(tiny, run_dir, *extra):
    fixed = [*tiny, *RUN, "checkpoint.weights_dtype=fp32", "checkpoint.interval=5", "checkpoint.keep_last=20"]
    cfg = config.apply_overrides(config.Config(), [*fixed, f"run.dir={run_dir}", *extra])
    return job.guarded(lambda: job.train(cfg))


def test_restore_best_exports_the_best_evaluations_weights(scripted, tiny, tmp_path):
    run_dir = tmp_path / "best"
    result = _job(tiny, run_dir, "early_stopping=on", "early_stopping.patience=3")
    assert result.exit_code == 0, result.message
    assert result.summary["step"] == 25 and result.summary["early_stop"]["best_step"] == 10
    exports = sorted((run_dir / "export").iterdir())
    assert [p.name for p in exports] == ["model-step-00000010-fp32.safetensors"]
    best = load_file(str(checkpoint.step_dir(run_dir / "checkpoints", 10) / "model.safetensors"))
    last = load_file(str(checkpoint.step_dir(run_dir / "checkpoints", 25) / "model.safetensors"))
    exported = load_file(str(exports[0]))
    assert exported.keys() <= best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    assert not all(torch.equal(exported[k], last[k]) for k in exported)


def test_without_restore_best_the_last_weights_are_exported(scripted, tiny, tmp_path):
    run_dir = tmp_path / "last"
    result = _job(
        tiny, run_dir, "early_stopping=on", "early_stopping.patience=3", "early_stopping.restore_best=false"
    )
    assert result.exit_code == 0 and result.summary["step"] == 25, result.message
    assert [p.name for p in (run_dir / "export").iterdir()] == ["model-step-00000025-fp32.safetensors"]


def test_a_stopped_and_resumed_run_decides_as_a_straight_one(scripted, tiny, tmp_path):
    # Smoothed: 3.0, 2.5, 2.45, 2.375, 2.4875, 2.59...; the first evaluation is warmup. Stops at 35.
    es = ["early_stopping=on", "early_stopping.patience=3", "early_stopping.smoothing=0.5"]
    es += ["early_stopping.warmup_evals=1"]
    straight = _job(tiny, tmp_path / "straight", *es)
    assert straight.exit_code == 0, straight.message
    sliced = _job(tiny, tmp_path / "sliced", *es, "trainer.stop_at_step=27")
    assert sliced.exit_code == 0 and sliced.summary["early_stop"] is None, sliced.message
    resumed = job.guarded(lambda: job.resume(str(tmp_path / "sliced"), []))
    assert resumed.exit_code == 0, resumed.message
    assert resumed.summary["early_stop"] == straight.summary["early_stop"]
    assert straight.summary["early_stop"]["step"] == 35 and straight.summary["early_stop"]["best_step"] == 20

    def state(run):
        path = checkpoint.latest_valid(tmp_path / run / "checkpoints")
        return checkpoint.load(path)[2]["early_stopping"]

    assert state("sliced") == state("straight")


def test_the_console_line_is_one_line(scripted, tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _job(tiny, tmp_path / "line", "early_stopping=on", "early_stopping.patience=3")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped early")]
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("stopped early at step 25: ")


def test_best_exports_are_written_off_the_loop_from_a_copy_taken_at_submit(tmp_path):
    from greenrun.ckpt import export

    weights = {"w": torch.ones(4, 4), "tied": None}
    weights["tied"] = weights["w"]  # tied tensors are written once
    exports = export.BackgroundExports()
    path = exports.submit(tmp_path, weights, 10, "fp32", keep=1)
    weights["w"].mul_(3)  # the loop goes on changing the weights while the thread writes
    exports.wait()
    assert torch.equal(load_file(path)["w"], torch.ones(4, 4))
    exports.submit(tmp_path, weights, 20, "bf16", keep=1)
    exports.wait()
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["model-step-00000020-bf16.safetensors"]
    (tmp_path / "export").rename(tmp_path / "elsewhere")
    (tmp_path / "export").symlink_to(tmp_path / "elsewhere")  # refused inside the thread ...
    exports.submit(tmp_path, weights, 30, "bf16", keep=1)
    with pytest.raises(OSError):
        exports.wait()  # ... and raised on the caller's thread
