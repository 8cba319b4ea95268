"""Exact resume through the real CLI: N steps straight == k steps, stop, resume, N-k more."""

import json

import pytest
import torch
from safetensors.torch import load_file

from greenrun.ckpt import checkpoint
from tests.common import TINY, run_cli, straight_and_sliced

STEPS = ["trainer.max_steps=20", "trainer.log_interval=1", "trainer.eval_interval=5", "preflight=false"]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_weights(run_dir):
    return load_file(str(checkpoint.step_dir(run_dir / "checkpoints", 20) / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("straight")
    r = run_cli("train", *TINY, f"data.cache_dir={cache_dir}", *STEPS, f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    return run_dir


def assert_same_run(a, b):
    la, lb = losses(a), losses(b)
    assert [la[s] for s in range(11, 21)] == [lb[s] for s in range(11, 21)]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_stop_and_resume_is_bit_exact(straight, tiny, tmp_path):
    run_dir = tmp_path / "sliced"
    r = run_cli("train", *tiny, *STEPS, "trainer.stop_at_step=10", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in checkpoint.committed(run_dir / "checkpoints")] == ["step-00000010"]
    assert "greenrun resume" in r.stdout
    r = run_cli("resume", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert_same_run(straight, run_dir)


def test_corrupt_newest_checkpoint_falls_back_and_still_matches(straight, tiny, tmp_path):
    run_dir = tmp_path / "corrupt"
    r = run_cli(
        "train", *tiny, *STEPS, "trainer.stop_at_step=10", "checkpoint.interval=5", f"run.dir={run_dir}"
    )
    assert r.returncode == 0, r.stderr
    shard = checkpoint.step_dir(run_dir / "checkpoints", 10) / "model.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    r = run_cli("resume", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "skipping checkpoint step-00000010" in r.stderr
    assert_same_run(straight, run_dir)


def test_resume_refuses_math_changes_unless_opted_in(tiny, tmp_path):
    run_dir = tmp_path / "drift"
    r = run_cli("train", *tiny, *STEPS, "trainer.stop_at_step=5", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    r = run_cli("resume", str(run_dir), "optimizer.lr=1e-2", "checkpoint.interval=3")
    assert r.returncode == 2
    assert "optimizer.lr: 0.002 (saved) -> 0.01" in r.stderr and "allow_config_change=true" in r.stderr
    assert "checkpoint.interval" not in r.stderr
    r = run_cli("resume", str(run_dir), "trainer.max_steps=8", "allow_config_change=true")
    assert r.returncode == 0, r.stderr
    assert max(losses(run_dir)) == 8


def test_every_lever_at_once_resumes_bit_exact(straight, tiny, tmp_path):
    """Muon (two optimizers in one, per-group lr scale), wsd, the seqlen curriculum crossing a rung change on
    each side of the resume, early stopping counting, the non-finite guard in skip mode: 20 straight steps
    equal 10 + resume + 10, and they are not the default run's steps."""
    levers = [
        "optimizer=muon",
        "optimizer.muon_lr_scale=2",
        "schedule=wsd",
        "curriculum=seqlen",
        "curriculum.start_len=8",
        "curriculum.bucket=8",
        "curriculum.ramp_steps=16",
        "early_stopping=on",
        "early_stopping.patience=10",
        "trainer.on_nonfinite=skip",
    ]
    a, b = straight_and_sliced([*tiny, *STEPS, *levers], tmp_path)
    assert_same_run(a, b)
    assert losses(a)[3] != losses(straight)[3]  # the levers really changed the training
