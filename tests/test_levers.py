"""Levers from the command line on CPU: fleet precision default, fp8 refusal, checkpoint policies, profiler,
weight export, auto micro-batch on CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from greenrun.runtime.profiling import Windows
from tests.common import run_cli


def test_fleet_precision_default_and_explicit_wins():
    env = {"GREENRUN_PRECISION": "bf16"}
    assert "name: bf16" in run_cli("train", "--cfg", "job", env=env).stdout
    assert "name: fp16" in run_cli("train", "precision=fp16", "--cfg", "job", env=env).stdout
    r = run_cli("train", "+recipe=bf16_ckpt", "--cfg", "job", env={"GREENRUN_PRECISION": "fp32"})
    assert "name: bf16" in r.stdout  # a recipe is an explicit choice too


def test_fleet_precision_typo_is_a_usage_error():
    r = run_cli("train", env={"GREENRUN_PRECISION": "bf61"})
    assert r.returncode == 2 and "GREENRUN_PRECISION" in r.stderr and "did you mean bf16" in r.stderr


def test_fp8_is_refused_at_startup_on_cpu(tmp_path):
    r = run_cli("train", "precision=fp8", f"run.dir={tmp_path / 'r'}")
    assert r.returncode == 2
    assert "compute capability >= 8.9" in r.stderr and "precision=bf16" in r.stderr
    assert "Traceback" not in r.stderr


def test_fp8_config_smokes_on_cpu_as_bf16(tiny):
    r = run_cli("smoke", *tiny, "precision=fp8")
    assert r.returncode == 0, r.stderr
    assert "fp8 ran as bf16 on the CPU" in r.stdout


def test_gpu_recipe_smokes_on_cpu(tiny):
    r = run_cli("smoke", "+recipe=gpt2_gpu", *tiny)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    if not torch.cuda.is_available():  # held against the table of GPUs, with how to pick one
        assert "fits every GPU of the table" in r.stdout and "smoke.target=NAME" in r.stdout


@pytest.mark.parametrize("policy", ["every_k", "sqrt", "selective"])
def test_checkpointing_policies_train(tiny, tmp_path, policy):
    r = run_cli(
        "train",
        *tiny,
        f"activation_checkpointing={policy}",
        "trainer.max_steps=2",
        "preflight=false",
        f"run.dir={tmp_path / 'r'}",
    )
    assert r.returncode == 0, r.stderr


def test_auto_micro_batch_needs_a_global_batch():
    r = run_cli("train", "trainer.micro_batch_size=auto", "--cfg", "job")
    assert r.returncode == 0  # composing is fine; running is not
    r = run_cli("train", "trainer.micro_batch_size=auto")
    assert r.returncode == 2 and "trainer.global_batch_tokens" in r.stderr


def test_auto_micro_batch_on_cpu_uses_the_estimate(tiny, tmp_path):
    run_dir = tmp_path / "r"
    r = run_cli(
        "train",
        *tiny,
        "trainer.micro_batch_size=auto",
        "trainer.global_batch_tokens=1024",
        "trainer.max_steps=2",
        "preflight=false",
        f"run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr
    saved = (run_dir / "config.yaml").read_text()
    assert "micro_batch_size: auto" not in saved  # resolved numbers are saved, so resume reuses them
    mb = int(saved.split("micro_batch_size: ")[1].split()[0])
    accum = int(saved.split("grad_accum_steps: ")[1].split()[0])
    assert mb * accum * 32 == 1024


def test_profile_windows_write_traces_and_export_is_bf16(tiny, tmp_path):
    run_dir = tmp_path / "r"
    r = run_cli(
        "train",
        *tiny,
        "trainer.max_steps=6",
        "trainer.profile_every=3",
        "trainer.profile_steps=2",
        "preflight=false",
        f"run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr
    traces = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert traces == ["steps-00000004-00000005.json"]
    assert "traceEvents" in json.loads((run_dir / "profile" / traces[0]).read_text())
    export = run_dir / "export" / "model-step-00000006-bf16.safetensors"
    weights = load_file(str(export))
    assert all(str(t.dtype) == "torch.bfloat16" for t in weights.values())


def test_profile_window_schedule(tmp_path):
    w = Windows(every=10, steps=3, out_dir=tmp_path, device=None, note=print)
    assert [s for s in range(35) if w._in_window(s)] == [10, 11, 12, 20, 21, 22, 30, 31, 32]
