"""Elastic resume: a run checkpointed on N processes continues on M with the same global batch
(micro x accum x world), recomputing the accumulation, and draws the same sequences at every step, so its losses
are the straight run's. Not bit for bit: gloo's all-reduce and the summed micro-steps add the same numbers in
another order (and each process here runs another number of CPU threads), hence a relative tolerance."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from greenrun import elastic
from greenrun.config import Config, ConfigError
from greenrun.data.dataset import Dataset, global_slot
from greenrun.train import curriculum
from tests.common import TINY, run_cli
from tests.test_curriculum import _cfg, _handmade

# The losses of a resumed run against the straight one: measured at most 8e-8 relative on 2 CPU cores.
REL = 1e-5
STEPS = ["trainer.max_steps=6", "trainer.log_interval=1", "preflight=false"]

torchrun_needed = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch without torch.distributed"
)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI under torchrun (`python -m torch.distributed.run`, as tests/test_ddp.py): gloo on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "greenrun"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "step" in r and "event" not in r}


def assert_close(run: Path, straight: Path, steps: range) -> None:
    a, b = rows(run), rows(straight)
    for s in steps:
        assert math.isclose(a[s]["loss"], b[s]["loss"], rel_tol=REL), (s, a[s]["loss"], b[s]["loss"])
    last = steps[-1]  # the run's last step evaluates: validation is the same batches on any world size too
    if "val_loss" in b[last]:
        assert math.isclose(a[last]["val_loss"], b[last]["val_loss"], rel_tol=REL)


def saved_trainer(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]


@pytest.fixture(scope="module")
def args(cache_dir: Path) -> list[str]:
    return [*TINY, f"data.cache_dir={cache_dir}", *STEPS]


@pytest.fixture(scope="module")
def straight_two(args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps on 2 processes, micro-batch 4 x accumulation 1: 8 sequences per step."""
    run_dir = tmp_path_factory.mktemp("straight2")
    ok(torchrun(2, "train", *args, f"run.dir={run_dir}"))
    return run_dir


@pytest.fixture(scope="module")
def straight_one(args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps on 1 process, micro-batch 4 x accumulation 2: the same 8 sequences per step."""
    run_dir = tmp_path_factory.mktemp("straight1")
    ok(run_cli("train", *args, "trainer.grad_accum_steps=2", f"run.dir={run_dir}"))
    return run_dir


# --- through the CLI ----------------------------------------------------------------------------------------


@torchrun_needed
def test_two_processes_resume_on_one(args, straight_two, tmp_path):
    run_dir = tmp_path / "2to1"
    ok(torchrun(2, "train", *args, "trainer.stop_at_step=3", f"run.dir={run_dir}"))
    r = ok(run_cli("resume", str(run_dir)))
    said = (
        "written by 2 processes with accumulation 1, resuming on 1 process with accumulation 2: the same "
        "8-sequence global batch"
    )
    assert said in r.stdout
    assert saved_trainer(run_dir)["grad_accum_steps"] == 2 and saved_trainer(run_dir)["micro_batch_size"] == 4
    assert_close(run_dir, straight_two, range(4, 7))


@torchrun_needed
def test_one_process_resumes_on_two(args, straight_one, tmp_path):
    run_dir = tmp_path / "1to2"
    ok(run_cli("train", *args, "trainer.grad_accum_steps=2", "trainer.stop_at_step=3", f"run.dir={run_dir}"))
    r = ok(torchrun(2, "resume", str(run_dir)))
    assert "resuming on 2 processes with accumulation 1: the same 8-sequence global batch" in r.stdout
    assert saved_trainer(run_dir)["grad_accum_steps"] == 1
    assert_close(run_dir, straight_one, range(4, 7))


@torchrun_needed
def test_fsdp_on_two_processes_is_the_one_process_run_and_resumes_on_one(args, straight_one, tmp_path):
    # FSDP2 shards parameters, gradients and AdamW's moments over the 2 ranks (gloo): the same losses as one
    # process with the same global batch; its checkpoint is gathered to full tensors, so 1 process resumes it.
    run_dir = tmp_path / "fsdp"
    ok(torchrun(2, "train", *args, "distributed=fsdp", "trainer.stop_at_step=3", f"run.dir={run_dir}"))
    assert_close(run_dir, straight_one, range(1, 4))
    r = ok(run_cli("resume", str(run_dir)))
    assert "resuming on 1 process with accumulation 2" in r.stdout
    assert_close(run_dir, straight_one, range(4, 7))


@torchrun_needed
def test_fsdp_resumes_a_one_process_checkpoint_on_two(args, straight_one, tmp_path):
    run_dir = tmp_path / "1to2fsdp"
    ok(run_cli("train", *args, "trainer.grad_accum_steps=2", "trainer.stop_at_step=3", f"run.dir={run_dir}"))
    ok(torchrun(2, "resume", str(run_dir), "distributed=fsdp"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["distributed"]["name"] == "fsdp"
    assert_close(run_dir, straight_one, range(4, 7))


@torchrun_needed
def test_a_run_is_the_same_on_one_process_and_on_two(straight_one, straight_two):
    assert_close(straight_one, straight_two, range(1, 7))


@torchrun_needed
def test_a_global_batch_that_does_not_cut_is_refused_with_the_arithmetic(tiny, tmp_path):
    run_dir = tmp_path / "uneven"
    ok(run_cli("train", *tiny, *STEPS, "trainer.stop_at_step=1", f"run.dir={run_dir}"))
    r = torchrun(2, "resume", str(run_dir))
    # Each rank exits 2 (a usage error, nothing started); torchrun itself exits 1 and names their code.
    assert r.returncode != 0 and "(exitcode: 2)" in r.stderr, r.stderr[-2000:]
    assert "needs 1 x 1 / 2 = 0.5 accumulation steps" in r.stderr
    assert "trainer.micro_batch_size=2 trainer.grad_accum_steps=1 on 2 processes" in r.stderr
    assert saved_trainer(run_dir)["grad_accum_steps"] == 1  # nothing was written
    # The override it names keeps the global batch (other sequences), so it is taken without allow_config_change.
    r = ok(torchrun(2, "resume", str(run_dir), "trainer.micro_batch_size=2", "trainer.grad_accum_steps=1"))
    assert "the same 4-sequence global batch, other sequences" in r.stdout
    assert saved_trainer(run_dir)["micro_batch_size"] == 2 and rows(run_dir)[6]["tokens"] == 6 * 4 * 32


# --- the batch split, as a function -------------------------------------------------------------------------


def _split(micro: int, accum: int) -> Config:
    base = Config()
    return dataclasses.replace(
        base, trainer=dataclasses.replace(base.trainer, micro_batch_size=micro, grad_accum_steps=accum)
    )


def _manifest(micro: int, accum: int, world: int) -> dict:
    return {"micro_batch_size": micro, "grad_accum_steps": accum, "world_size": world}


@pytest.mark.parametrize(
    ("written", "world", "accum", "expect"),
    [(2, 1, 1, 2), (1, 2, 2, 1), (4, 2, 1, 2), (2, 4, 2, 1), (2, 2, 3, 3)],
)
def test_the_accumulation_keeps_the_global_batch(written, world, accum, expect):
    saved = _split(4, accum)
    cfg, as_written = elastic.keep_global_batch(saved, saved, _manifest(4, accum, written), world, "ckpt")
    assert (cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps) == (4, expect)
    assert as_written == saved  # what the checkpoint's config hash covers


def test_an_override_that_keeps_the_global_batch_is_taken_and_one_that_does_not_is_left_to_the_maths_check():
    saved = _split(4, 1)
    kept, as_written = elastic.keep_global_batch(saved, _split(2, 1), _manifest(4, 1, 1), 2, "ckpt")
    assert kept == _split(2, 1) and as_written == saved
    bigger, as_written = elastic.keep_global_batch(saved, _split(4, 2), _manifest(4, 1, 1), 2, "ckpt")
    assert bigger == _split(4, 2) and as_written is None


def test_auto_keeps_the_saved_probed_split():
    saved = _split(6, 2)
    cfg, _ = elastic.keep_global_batch(saved, _split("auto", 1), _manifest(6, 2, 1), 2, "ckpt")
    assert (cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps) == (6, 1)


def test_a_split_that_does_not_fit_names_the_arithmetic_and_the_fixes():
    saved = _split(4, 1)
    with pytest.raises(ConfigError) as e:
        elastic.keep_global_batch(saved, saved, _manifest(4, 1, 2), 3, "step-00000003")
    (message,) = e.value.problems
    assert (
        "written by 2 processes with micro-batch 4 x accumulation 1, a global batch of 8 sequences" in message
    )
    assert "needs 1 x 2 / 3 = 0.6667 accumulation steps, not a whole number" in message
    assert "resume on 1 or 2 processes" in message
    assert "no micro-batch x accumulation on 3 processes makes 8 sequences" in message
    allowed = dataclasses.replace(saved, allow_config_change=True)
    cfg, as_written = elastic.keep_global_batch(saved, allowed, _manifest(4, 1, 2), 3, "step-00000003")
    assert cfg.trainer.grad_accum_steps == 1 and as_written is None


# --- slots: what a micro-step draws -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    from greenrun import data
    from greenrun.data import DataConfig

    root = tmp_path_factory.mktemp("corpus")
    (root / "doc.txt").write_text("".join(f"def g{i}(x):\n    return x - {i}\n" for i in range(400)))
    cfg = DataConfig(source="text", paths=[str(root / "*.txt")], max_chars=0, cache_dir=str(root / "cache"))
    return data.build(cfg, 300)


CURRICULA = {
    "none": _cfg(name="none"),
    "seqlen": _cfg(name="seqlen", start_len=8, bucket=8, ramp_steps=10),
    "difficulty": _cfg(name="difficulty", n_bins=2, ramp_steps=10),
}


@pytest.mark.parametrize("name", CURRICULA)
def test_a_steps_sequences_are_the_same_on_any_world_size(ds: Dataset, name: str) -> None:
    cur = curriculum.build(CURRICULA[name], ds, 32, 4, 1337)

    def step_rows(step: int, world: int, accum: int) -> list[tuple[int, ...]]:
        slots = [global_slot(m, r, world) for r in range(world) for m in range(accum)]
        assert sorted(slots) == list(range(world * accum))
        return sorted(tuple(row) for s in slots for row in cur.batch(step, s)[0].tolist())

    for step in (0, 5, 12):
        one = step_rows(step, 1, 4)
        assert one == step_rows(step, 2, 2) == step_rows(step, 4, 1)
        assert one != step_rows(step + 1, 1, 4)


# Drawn by the code before slots, `batch(split, step, micro_step, rank=0, ...)`, on the handmade corpus: a
# single process must draw exactly these still, or no run written before slots would resume exactly.
BEFORE_SLOTS = {
    "none": [
        [[1, 2, 0], [3, 0, 4], [3, 3, 3], [2, 0, 3]],
        [[3, 3, 0], [3, 3, 3], [3, 0, 4], [1, 1, 0]],
        [[1, 2, 0], [0, 3, 3], [1, 2, 0], [3, 3, 0]],
    ],
    "seqlen": [
        [[2, 0], [0, 4], [3, 3], [0, 3]],
        [[0, 4], [3, 3], [1, 1], [1, 0]],
        [[1, 2, 0, 3], [2, 0, 3, 3]],
    ],
    "difficulty": [
        [[1, 2, 0], [1, 1, 0], [1, 1, 0], [1, 2, 0]],
        [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]],
        [[1, 2, 0], [1, 1, 0], [1, 2, 0], [3, 3, 3]],
    ],
    "val": [[[2, 3, 0], [0, 4, 3]], [[3, 0, 4], [1, 2, 3]]],
}


def test_a_single_process_draws_what_it_drew_before_slots(tmp_path: Path) -> None:
    hand, seed = _handmade(tmp_path / "hand"), 5
    built = {
        "none": curriculum.build(_cfg(name="none"), hand, 3, 4, seed),
        "seqlen": curriculum.build(
            _cfg(name="seqlen", start_len=2, bucket=2, ramp_steps=4), hand, 4, 2, seed
        ),
        "difficulty": curriculum.build(
            _cfg(name="difficulty", n_bins=2, pacing="step", stages=2, ramp_steps=4), hand, 3, 4, seed
        ),
    }
    for name, cur in built.items():
        drawn = [
            cur.batch(step, global_slot(micro, 0, 1))[0].tolist() for step, micro in ((0, 0), (3, 1), (7, 2))
        ]
        assert drawn == BEFORE_SLOTS[name], name
    assert [hand.batch("val", i, 0, 2, 3, seed)[0].tolist() for i in (0, 1)] == BEFORE_SLOTS["val"]
    assert [global_slot(m, 0, 1) for m in range(5)] == list(range(5))
