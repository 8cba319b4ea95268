"""Metric sinks, `logger=...`: TensorBoard's event files hold what metrics.jsonl holds (read back, through a
resume that redoes logged steps), and a sink whose package is missing is a config error naming the key and the
pip command, before anything trains."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from greenrun import config, job
from greenrun.runtime import sinks
from tests.common import TINY, run_cli

RUN = ["trainer.log_interval=1", "trainer.eval_interval=2", "checkpoint.interval=2", "checkpoint.keep_last=3"]
RUN += ["preflight=false", "logger=[jsonl,tensorboard]"]


def _job(overrides: list[str], resume: Path | None = None) -> None:
    if resume is None:
        run = lambda: job.train(config.apply_overrides(config.Config(), overrides))  # noqa: E731
    else:
        run = lambda: job.resume(str(resume), [])  # noqa: E731
    result = job.guarded(run)
    assert result.exit_code == 0, result.message


def _metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every number metrics.jsonl logged (its last record per step)."""
    series: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            continue
        for tag, value in sinks.scalars(record).items():
            series.setdefault(tag, {})[record["step"]] = value
    return series


def _events(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    series: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        series[tag] = {e.step: e.value for e in events}
    return series


def _same(events: dict[str, dict[int, float]], metrics: dict[str, dict[int, float]]) -> None:
    assert set(events) == set(metrics)
    for tag, by_step in metrics.items():
        assert sorted(events[tag]) == sorted(by_step), tag
        for step, value in by_step.items():  # event files hold float32
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A run trained to step 6 of 8, then resumed from step 4 as if killed after logging steps 5 and 6."""
    run_dir = tmp_path_factory.mktemp("sinks") / "run"
    overrides = [*TINY, f"data.cache_dir={cache_dir}", *RUN, "trainer.max_steps=8", "trainer.stop_at_step=6"]
    _job([*overrides, f"run.dir={run_dir}"])
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # the kill: steps 5, 6 logged, not checkpointed
    _job([], resume=run_dir)
    return run_dir


def test_tensorboard_holds_what_metrics_jsonl_holds_across_a_resume(sliced: Path) -> None:
    metrics = _metrics(sliced)
    assert sorted(metrics["loss"]) == list(range(1, 9)) and sorted(metrics["val_loss"]) == [0, 2, 4, 6, 8]
    assert {"lr", "grad_norm", "tokens", "tok_per_s"} <= set(metrics)
    assert "time" not in metrics and "energy_source" not in metrics  # wall clock and strings stay in jsonl
    _same(_events(sliced), metrics)


def test_a_missing_package_is_a_config_error_naming_the_key_and_pip(monkeypatch) -> None:
    for name in ("mlflow", "wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    cfg = config.apply_overrides(config.Config(), ["logger=[jsonl,mlflow,wandb,tensorboard]"])
    with pytest.raises(config.ConfigError) as e:
        config.validate(cfg, check_device=False)
    said = str(e.value)
    assert "logger=mlflow: mlflow" in said and "not installed here; pip install mlflow" in said
    assert "logger=wandb: wandb is not installed here; pip install wandb" in said
    assert (
        "logger=tensorboard: tensorboard is not installed here; pip install 'greenrun[tensorboard]'" in said
    )
    typo = config.apply_overrides(config.Config(), ["logger=tensorbord"])
    with pytest.raises(
        config.ConfigError, match=r"logger: unknown value 'tensorbord' \(did you mean tensorboard\?\)"
    ):
        config.validate(typo, check_device=False)


@pytest.mark.skipif(sinks.installed("wandb"), reason="wandb is installed here")
def test_train_refuses_a_sink_that_is_not_installed_before_training(tiny, tmp_path) -> None:
    r = run_cli("train", *tiny, "logger=[jsonl,wandb]", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "logger=wandb" in r.stderr and "pip install wandb" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()


def test_logger_takes_one_name_a_list_or_commas() -> None:
    assert sinks.names("tensorboard") == ["tensorboard"]
    assert sinks.names(["jsonl", "tensorboard", "jsonl"]) == ["jsonl", "tensorboard"]
    assert sinks.names("jsonl, tensorboard") == ["jsonl", "tensorboard"]
    assert sinks.validate(["jsonl"]) == [] and "a sink name or a list" in sinks.validate(3)[0]


def test_a_failing_sink_is_dropped_with_a_warning_and_other_ranks_write_nothing(
    tmp_path, monkeypatch, caplog
) -> None:
    opened = []

    class Boom:
        def __init__(self, run_dir: Path, params: dict, first_step: int) -> None:
            opened.append((first_step, params["trainer.seed"]))

        def write(self, step: int, scalars: dict, walltime: float | None) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            pass

    monkeypatch.setitem(sinks.SINKS._options, "boom", sinks.SinkOption((), "", Boom))
    fan = sinks.Sinks(["jsonl", "boom"], tmp_path, config.Config())
    fan.begin(4)  # resumed at step 4: this process logs from step 5
    fan.write({"step": 5, "loss": 1.0})
    fan.write({"step": 6, "loss": 0.9})  # dropped after the first failure: no second warning
    fan.close()
    assert opened == [(5, 1337)]
    assert [r.getMessage() for r in caplog.records if "logger=boom" in r.getMessage()] == [
        "logger=boom: OSError: disk full; it is off for the rest of this run"
    ]
    quiet = sinks.Sinks(["boom"], tmp_path, config.Config(), enabled=False)  # rank 1
    quiet.write({"step": 1, "loss": 1.0})
    assert opened == [(5, 1337)]
