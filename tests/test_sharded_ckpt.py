"""distributed.checkpoint=sharded: every fsdp rank writes its own safetensors shards through
torch.distributed.checkpoint, committed with greenrun's manifest; resumed on one process (full tensors) and on
two fsdp processes (each reads its own slices), with the straight run's losses (test_elastic.py's tolerance)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from greenrun import cli
from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig
from greenrun.ckpt.pipeline import Checkpointer
from greenrun.ckpt.remote import Remote
from greenrun.ckpt.uploader import Uploader
from greenrun.config import Config, ConfigError, apply_overrides
from greenrun.config import validate as validate_config
from greenrun.storage import LocalStorage
from tests.common import run_cli
from tests.test_elastic import args, assert_close, ok, straight_one, torchrun, torchrun_needed  # noqa: F401

SHARDED = ["distributed=fsdp", "distributed.checkpoint=sharded"]


@pytest.fixture(scope="module")
def sharded_run(args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """3 of 6 steps on 2 fsdp processes, checkpointed sharded at step 3."""
    run_dir = tmp_path_factory.mktemp("sharded") / "run"
    ok(torchrun(2, "train", *args, *SHARDED, "trainer.stop_at_step=3", f"run.dir={run_dir}"))
    return run_dir


def _only_checkpoint(run_dir: Path) -> Path:
    (path,) = checkpoint.committed(run_dir / "checkpoints")
    return path


def _copy(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    return dst


@torchrun_needed
def test_every_rank_writes_its_shards_under_one_manifest(sharded_run, straight_one):  # noqa: F811
    assert_close(sharded_run, straight_one, range(1, 4))
    path = _only_checkpoint(sharded_run)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and manifest["world_size"] == 2 and manifest["step"] == 3
    shards = sorted(p.relative_to(path).as_posix() for p in (path / "shards").iterdir())
    assert len(shards) == 2  # one file per rank
    assert set(manifest["files"]) == {*shards, "optimizer_meta.pt", "trainer.pt"}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert on_disk == {*manifest["files"], "manifest.json"}  # no pickled DCP .metadata, no full model copy
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == checkpoint.sha256_file(path / name)
    with safe_open(str(path / shards[0]), "pt") as f:  # DCP's offsets live in the safetensors header
        assert "DCP_SHARDING_INFO" in f.metadata() and any(k.startswith("optim.") for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
    for name in ("optimizer_meta.pt", "trainer.pt"):  # the only .pt files: plain containers
        torch.load(path / name, weights_only=True)
    assert checkpoint.verify(path) is None


@torchrun_needed
def test_a_sharded_checkpoint_resumes_on_one_process(sharded_run, straight_one, tmp_path):  # noqa: F811
    run_dir = _copy(sharded_run, tmp_path / "to1")
    r = ok(run_cli("resume", str(run_dir), "distributed=ddp"))
    assert "resuming on 1 process with accumulation 2" in r.stdout
    assert_close(run_dir, straight_one, range(4, 7))


@torchrun_needed
def test_a_sharded_checkpoint_resumes_sharded_on_two_processes(sharded_run, straight_one, tmp_path):  # noqa: F811
    run_dir = _copy(sharded_run, tmp_path / "to2")
    ok(torchrun(2, "resume", str(run_dir)))
    assert_close(run_dir, straight_one, range(4, 7))
    newest = checkpoint.committed(run_dir / "checkpoints")[0]
    assert checkpoint.read_manifest(newest)["layout"] == "sharded" and checkpoint.verify(newest) is None


@torchrun_needed
def test_shards_of_two_processes_are_resharded_over_four(args, tmp_path):  # noqa: F811
    # Micro-batch 2 x accumulation 2 on 2 processes: 4 processes with accumulation 1 keep the same sequences,
    # and 1 process (accumulation 4, the full-tensor path) is the reference for what DCP resharded.
    run_dir = tmp_path / "four"
    split = ["trainer.micro_batch_size=2", "trainer.grad_accum_steps=2"]
    ok(torchrun(2, "train", *args, *SHARDED, *split, "trainer.stop_at_step=3", f"run.dir={run_dir}"))
    one = _copy(run_dir, tmp_path / "one")
    r = ok(torchrun(4, "resume", str(run_dir)))
    assert "resuming on 4 processes with accumulation 1" in r.stdout
    ok(run_cli("resume", str(one), "distributed=ddp"))
    assert_close(run_dir, one, range(4, 7))
    assert len(list((checkpoint.committed(run_dir / "checkpoints")[0] / "shards").iterdir())) == 4


@torchrun_needed
def test_export_reads_the_shards_into_the_full_weights(sharded_run, tmp_path):
    from safetensors.torch import load_file

    run_dir = _copy(sharded_run, tmp_path / "export")
    full, _, _, _ = checkpoint.load(_only_checkpoint(run_dir))
    assert full["wte.weight"].shape == (512, 64)  # whole tensors, put together from both ranks' rows
    out = tmp_path / "st"
    assert cli.main(["export", str(run_dir), "format=safetensors", "dtype=fp32", f"out={out}"]) == 0
    weights = load_file(str(out / "model-step-00000003-fp32.safetensors"))
    assert set(weights) <= set(full) and all(torch.equal(w, full[k]) for k, w in weights.items())


@torchrun_needed
def test_a_corrupted_or_stray_shard_fails_verification(sharded_run, tmp_path):
    path = _only_checkpoint(_copy(sharded_run, tmp_path / "bad"))
    shard = sorted((path / "shards").iterdir())[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "sha256 does not match" in checkpoint.verify(path)
    assert checkpoint.latest_valid(path.parent, warn=lambda _: None) is None  # nothing older to fall back to
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(path)
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert checkpoint.verify(path) is None
    shutil.copy(shard, path / "shards" / "extra.safetensors")  # DCP's reader would read it: refused
    assert "not in the manifest" in checkpoint.verify(path)


def _pending(written: Path, root: Path, step: int) -> checkpoint.Pending:
    """What rank 0 holds after every rank wrote its shards: here, the shards of a real run, copied."""
    tmp = checkpoint.temp_dir(root, checkpoint.step_dir(root, step).name)
    shutil.copytree(written / "shards", tmp / "shards")
    meta = torch.load(written / "optimizer_meta.pt", weights_only=True)
    trainer = torch.load(written / "trainer.pt", weights_only=True)
    return checkpoint.Pending(step, tmp, meta, trainer, {"world_size": 2})


@torchrun_needed
def test_sharded_checkpoints_commit_and_upload_every_file_also_in_an_emergency(sharded_run, tmp_path):
    written, root = _only_checkpoint(sharded_run), tmp_path / "ckpt"
    root.mkdir()
    store = LocalStorage(tmp_path / "bucket")
    p = Checkpointer(CheckpointConfig(), root, uploader=Uploader(Remote(store, "run")))
    p.save(lambda: _pending(written, root, 4), wait=True)
    p.uploader.wait()
    done = p.emergency(lambda: _pending(written, root, 5), seconds_left=lambda: 20.0)
    assert done.where == "bucket" and done.exit_code == 75, done.message
    for step in (4, 5):
        local = checkpoint.step_dir(root, step)
        assert checkpoint.verify(local) is None and not list(root.glob(".tmp-*"))
        listed = checkpoint.read_manifest(local)["files"]
        keys = [k for k in store.list(f"run/checkpoints/step-{step:08d}/") if not k.endswith("manifest.json")]
        assert {k.split("/", 4)[4] for k in keys} == set(listed)  # the shards/ files went up too
    p.close()
    remote = Remote(store, "run")  # back from the bucket into an empty directory, verified like a local one
    fetched = remote.fetch(5, tmp_path / "fetched")
    assert checkpoint.verify(fetched) is None and len(list((fetched / "shards").iterdir())) == 2
    assert checkpoint.load(fetched)[0]["wte.weight"].shape == (512, 64)
    remote.prune(1, 0)  # the older step goes with its shards: none of its keys is left behind
    assert remote.steps() == [5] and not store.list("run/checkpoints/step-00000004/")


def test_sharded_checkpoints_need_fsdp():
    cfg = apply_overrides(Config(), ["distributed.checkpoint=sharded"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, check_device=False, need_corpus=False)
    (problem,) = [p for p in e.value.problems if "distributed.checkpoint" in p]
    assert "distributed.checkpoint=sharded with distributed=ddp" in problem and "distributed=fsdp" in problem
