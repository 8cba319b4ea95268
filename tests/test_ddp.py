"""Data parallel through torchrun (gloo on CPU): two processes train one run; rank 0 writes it."""

import json
import subprocess
import sys

import pytest
import torch

from greenrun.ckpt import checkpoint
from tests.common import run_cli

# torchrun is run as `python -m torch.distributed.run`, so it needs no torchrun on PATH (an unactivated venv
# has none, and checking PATH skipped these tests there); only a torch built without distributed lacks it.
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch without torch.distributed"
)


def torchrun_train(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "greenrun", "train"]
    r = subprocess.run([*cmd, *overrides, "preflight=false"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_torchrun_two_processes(tiny, tmp_path):
    run_dir = tmp_path / "ddp"
    r = torchrun_train(*tiny, "trainer.max_steps=3", "trainer.log_interval=1", f"run.dir={run_dir}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]  # one writer: no duplicated lines
    assert rows[-1]["tokens"] == 3 * 4 * 32 * 2  # steps x micro x seq x world
    assert checkpoint.verify(checkpoint.step_dir(run_dir / "checkpoints", 3)) is None
    assert r.stdout.count("greenrun summary") == 1


def test_resume_with_another_world_size_keeps_the_global_batch(tiny, tmp_path):
    # Elastic resume (tests/test_elastic.py compares the losses): 2 x 4 x accumulation 1 goes on as 1 x 4 x 2.
    run_dir = tmp_path / "ddp2"
    torchrun_train(*tiny, "trainer.max_steps=4", "trainer.stop_at_step=2", f"run.dir={run_dir}")
    r = run_cli("resume", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "resuming on 1 process with accumulation 2: the same 8-sequence global batch" in r.stdout
    manifest = checkpoint.read_manifest(checkpoint.step_dir(run_dir / "checkpoints", 4))
    assert (manifest["world_size"], manifest["grad_accum_steps"], manifest["micro_batch_size"]) == (1, 2, 4)
    assert "grad_accum_steps: 2" in (run_dir / "config.yaml").read_text()
