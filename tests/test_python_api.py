"""A Trainer and a whole job driven from Python, without the CLI (the README shows the same lines)."""

from __future__ import annotations

import json
from pathlib import Path

from greenrun import config, job
from greenrun.trainer import Trainer


def test_trainer_from_python(tiny: list[str], tmp_path: Path) -> None:
    cfg = config.apply_overrides(config.Config(), [*tiny, "trainer.max_steps=3", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    assert result["finished"] and result["step"] == 3
    assert result["val_loss"] < result["first_val_loss"] * 1.5
    assert (tmp_path / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][
        -1
    ] == 3


def test_job_from_python_maps_to_an_exit_code(tiny: list[str], tmp_path: Path) -> None:
    cfg = config.apply_overrides(
        config.Config(), [*tiny, "trainer.max_steps=2", f"run.dir={tmp_path / 'run'}", "preflight=false"]
    )
    result = job.guarded(lambda: job.train(cfg))
    assert result.outcome is job.Outcome.OK and result.exit_code == 0, result.message
    assert result.summary["step"] == 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val_loss"] == result.summary["val_loss"]
    assert config.load_yaml(tmp_path / "run" / "config.yaml") == cfg


def test_job_turns_a_bad_config_into_a_usage_outcome(tmp_path: Path) -> None:
    result = job.guarded(lambda: job.resume(str(tmp_path / "nowhere"), []))
    assert result.outcome is job.Outcome.USAGE and result.exit_code == 2
    assert "config.yaml" in result.message
