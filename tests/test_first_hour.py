"""What a new user meets in the first hour: warnings that come with numbers, an ETA in logs, a whole-run
wall time after a resume, a configurable sample, exports that do not pile up, CPU threads that are chosen."""

from __future__ import annotations

import json
import logging

import torch

from greenrun import config, job
from greenrun.runtime import distributed, hardware
from greenrun.trainer import Trainer
from tests.common import run_cli

CPU = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_half_precision_on_a_cpu_warns_with_measured_numbers(monkeypatch, caplog):
    fp32, bf16 = hardware.matmul_rates(torch.bfloat16, seconds=0.01)  # the real measurement runs
    assert fp32 > 0 and bf16 > 0
    monkeypatch.setattr(hardware, "matmul_rates", lambda dtype: (40.0, 8.0))
    with caplog.at_level(logging.WARNING, logger="greenrun.job"):
        job._warn_if_slow_here(config.apply_overrides(config.Config(), ["precision=bf16"]), CPU)
    assert "precision=bf16 runs 5.0x slower than fp32 on this CPU (8 vs 40 GFLOP/s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="greenrun.job"):
        job._warn_if_slow_here(config.Config(), CPU)  # fp32: nothing to say
    assert caplog.text == ""


def test_a_gpu_sized_auto_batch_on_a_cpu_warns(caplog):
    cfg = config.apply_overrides(
        config.Config(), ["trainer.micro_batch_size=auto", "trainer.global_batch_tokens=524288"]
    )
    with caplog.at_level(logging.WARNING, logger="greenrun.job"):
        resolved = job.resolve_micro_batch(cfg, CPU)
    assert isinstance(resolved.trainer.micro_batch_size, int)
    assert "524,288 tokens" in caplog.text and "wants a GPU" in caplog.text
    assert cfg.trainer.micro_batch_size == "auto"  # a new config, the old one untouched


def test_cpu_threads_are_chosen_and_can_be_set(monkeypatch, tiny, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert hardware.cpu_threads(0) == 3 and hardware.cpu_threads(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert hardware.cpu_threads(0, local_processes=64) == 1
    before = torch.get_num_threads()
    try:
        cfg = config.apply_overrides(config.Config(), [*tiny, "trainer.cpu_threads=1", f"run.dir={tmp_path}"])
        Trainer(cfg, tmp_path, dist=CPU).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_log_lines_carry_an_eta_and_a_resumed_run_reports_its_whole_wall_time(tiny, tmp_path):
    run_dir = tmp_path / "r"
    common = [*tiny, "trainer.max_steps=8", "trainer.log_interval=2", "preflight=false", f"run.dir={run_dir}"]
    r = run_cli("train", *common, "trainer.stop_at_step=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("step 2 ") and " eta " in line for line in r.stdout.splitlines()), r.stdout
    first = json.loads((run_dir / "summary.json").read_text())
    r = run_cli("resume", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["tokens"] == 2 * first["tokens"]
    assert done["run_wall_s"] >= done["wall_s"] + 0.5 * first["wall_s"]
    assert "s the whole run" in r.stdout and "s this process" in r.stdout


def test_the_sample_prompt_is_configurable_and_exports_do_not_pile_up(tiny, tmp_path):
    run_dir = tmp_path / "r"
    common = [*tiny, "trainer.max_steps=4", "preflight=false", f"run.dir={run_dir}"]
    r = run_cli("train", *common, "trainer.stop_at_step=2", "trainer.sample_prompt=class ", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("resume", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / "summary.json").read_text())["sample"].startswith("class")
    exports = sorted(p.name for p in (run_dir / "export").iterdir())
    assert exports == ["model-step-00000004-bf16.safetensors"]  # step 2's was replaced (keep_exports=1)


def test_the_default_sample_prompt_comes_from_the_data_source():
    from greenrun import data

    assert data.sample_prompt(data.DataConfig()) == "def "
    assert data.sample_prompt(data.DataConfig(source="text", paths=["x"])) == "\n"
