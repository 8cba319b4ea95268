import json
import random
import threading

import pytest
import torch

from greenrun.ckpt import checkpoint, pipeline
from greenrun.ckpt.checkpoint import CheckpointConfig
from greenrun.ckpt.pipeline import Checkpointer


def snapshot(step: int, value: float = 1.0) -> checkpoint.Snapshot:
    w = torch.full((4, 3), value)
    model_state, aliases = checkpoint.unique_tensors(
        {"wte.weight": w, "lm_head.weight": w, "b": torch.zeros(3)}
    )
    return checkpoint.Snapshot(
        step=step,
        model=model_state,
        aliases=aliases,
        optimizer={"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}}, "param_groups": []},
        trainer={"step": step, "rng": {"cpu": torch.get_rng_state()}},
        meta={"config_hash": "abc"},
    )


def test_write_load_round_trip_with_tied_weights(tmp_path):
    path = checkpoint.write(snapshot(5, 2.0), tmp_path)
    assert path.name == "step-00000005"
    model, optim, trainer, manifest = checkpoint.load(path)
    assert torch.equal(model["lm_head.weight"], torch.full((4, 3), 2.0))
    assert manifest["aliases"] == {"lm_head.weight": "wte.weight"}
    assert trainer["step"] == 5 and optim["state"][0]["step"].item() == 3.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_manifest_is_the_commit_marker(tmp_path):
    path = checkpoint.write(snapshot(1), tmp_path)
    (path / "manifest.json").unlink()
    assert checkpoint.latest_valid(tmp_path) is None


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    checkpoint.write(snapshot(1), tmp_path)
    newest = checkpoint.write(snapshot(2), tmp_path)
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(blob))
    warnings = []
    found = checkpoint.latest_valid(tmp_path, warn=warnings.append)
    assert found is not None and found.name == "step-00000001"
    assert "sha256" in warnings[0]
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(newest)


def test_truncated_file_detected(tmp_path):
    path = checkpoint.write(snapshot(3), tmp_path)
    with open(path / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    assert "size" in checkpoint.verify(path)


def test_pickled_code_is_refused(tmp_path, capfd):
    """A planted pickle that would run code when unpickled must be refused, manifest or not."""
    path = checkpoint.write(snapshot(4), tmp_path)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 4, "x": Boom()}, path / "trainer.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = {
        "size": (path / "trainer.pt").stat().st_size,
        "sha256": checkpoint.sha256_file(path / "trainer.pt"),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.load(path)
    assert "pwned" not in capfd.readouterr().out, "the planted pickle ran"


def test_prune_keeps_newest_and_never_the_protected(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.write(snapshot(step), tmp_path)
    removed = checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000002"]
    assert [p.name for p in checkpoint.committed(tmp_path)] == ["step-00000004", "step-00000003"]


def test_prune_never_deletes_newest_valid_even_if_newer_are_corrupt(tmp_path):
    checkpoint.write(snapshot(1), tmp_path)
    for step in (2, 3):
        p = checkpoint.write(snapshot(step), tmp_path)
        (p / "trainer.pt").write_bytes(b"garbage")
    checkpoint.prune(tmp_path, keep_last=1)
    assert (tmp_path / "step-00000001").is_dir()
    assert checkpoint.latest_valid(tmp_path, warn=lambda _: None).name == "step-00000001"


def test_rewrite_of_committed_step_keeps_the_committed_one(tmp_path):
    first = checkpoint.write(snapshot(7, 1.0), tmp_path)
    again = checkpoint.write(snapshot(7, 9.0), tmp_path)
    assert again == first
    # The two snapshots differ only in the weight value (1.0 vs 9.0); "b" is zeros in both.
    model = checkpoint.load(first)[0]
    assert torch.equal(model["wte.weight"], torch.full((4, 3), 1.0))
    assert torch.equal(model["b"], torch.zeros(3))


def test_clean_stale_removes_only_temp_dirs(tmp_path):
    checkpoint.write(snapshot(1), tmp_path)
    (tmp_path / ".tmp-step-00000002-dead").mkdir()
    removed = checkpoint.clean_stale(tmp_path)
    assert [p.name for p in removed] == [".tmp-step-00000002-dead"]
    assert (tmp_path / "step-00000001").is_dir()


# --- staging: host buffers allocated once, reused by every later save ------------------------------------


def live_state(value: float = 1.0) -> dict:
    """A trainer's state tree in miniature: tied weights, optimizer moments, RNG and plain numbers."""
    w = torch.full((4, 3), value)
    return {
        "model": {"wte.weight": w, "lm_head.weight": w, "b": torch.zeros(3)},
        "optimizer": {
            "state": {0: {"exp_avg": torch.ones(2) * value, "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "trainer": {"step": 5, "first_val": None, "scaler": {}, "rng": {"cpu": torch.get_rng_state()}},
    }


def staged(stager: checkpoint.Stager, state: dict, step: int = 5) -> checkpoint.Snapshot:
    unique, aliases = checkpoint.unique_tensors(state["model"])
    return stager.snapshot(
        step, unique, aliases, state["optimizer"], state["trainer"], {"config_hash": "abc"}
    )


def test_stager_reuses_its_buffers_on_the_next_save():
    stager, state = checkpoint.Stager(), live_state()
    first = staged(stager, state)
    ptrs = {k: t.data_ptr() for k, t in first.model.items()}
    moment = first.optimizer["state"][0]["exp_avg"].data_ptr()
    assert stager.allocated_bytes > 0 and not stager.reused
    del first  # written: its writer dropped it
    state["model"]["wte.weight"].add_(1.0)
    second = staged(stager, state)
    assert {k: t.data_ptr() for k, t in second.model.items()} == ptrs
    assert second.optimizer["state"][0]["exp_avg"].data_ptr() == moment
    assert stager.reused and stager.allocated_bytes == 0
    assert torch.equal(second.model["wte.weight"], torch.full((4, 3), 2.0))  # this step's values


def test_staged_snapshot_is_a_copy_of_its_step():
    stager, state = checkpoint.Stager(), live_state()
    snap = staged(stager, state)
    state["model"]["wte.weight"].add_(5.0)  # training goes on while the snapshot is written
    state["optimizer"]["state"][0]["exp_avg"].mul_(7.0)
    state["optimizer"]["param_groups"][0]["lr"] = 0.5
    state["trainer"]["scaler"]["scale"] = 2.0
    assert torch.equal(snap.model["wte.weight"], torch.full((4, 3), 1.0))
    assert torch.equal(snap.optimizer["state"][0]["exp_avg"], torch.ones(2))
    assert snap.optimizer["param_groups"][0]["lr"] == 0.1 and snap.trainer["scaler"] == {}
    assert snap.model["wte.weight"].data_ptr() != state["model"]["wte.weight"].data_ptr()


def test_stager_reallocates_what_changed_and_frees_what_is_gone():
    stager, state = checkpoint.Stager(), live_state()
    state["optimizer"]["state"] = {}  # before the first optimizer step: no moments yet
    state["model"]["extra"] = torch.ones(8)
    first = staged(stager, state)
    kept = first.model["b"].data_ptr()
    del first
    state["optimizer"]["state"] = {0: {"exp_avg": torch.full((2,), 4.0)}}  # appeared after step 1
    state["model"]["b"] = torch.arange(6, dtype=torch.float64)  # another shape and dtype at the same path
    del state["model"]["extra"]
    second = staged(stager, state)
    assert stager.allocated_bytes == 2 * 4 + 6 * 8
    assert (
        torch.equal(second.model["b"], torch.arange(6, dtype=torch.float64))
        and second.model["b"].data_ptr() != kept
    )
    assert torch.equal(second.optimizer["state"][0]["exp_avg"], torch.full((2,), 4.0))
    assert (
        "extra" not in second.model
        and stager.nbytes == 12 * 4 + 6 * 8 + 2 * 4 + torch.get_rng_state().numel()
    )


def test_stager_keeps_non_tensor_leaves_in_fresh_containers():
    stager, state = checkpoint.Stager(), live_state()
    state["trainer"]["rng"]["python"] = random.getstate()
    state["trainer"]["history"] = [1, (2.0, "x"), None]
    snap = staged(stager, state)
    assert snap.trainer["rng"]["python"] == random.getstate() and isinstance(
        snap.trainer["rng"]["python"], tuple
    )
    assert snap.trainer["history"] == [1, (2.0, "x"), None] and snap.trainer["first_val"] is None
    assert snap.trainer["history"] is not state["trainer"]["history"]
    assert snap.optimizer["param_groups"][0] is not state["optimizer"]["param_groups"][0]
    assert snap.aliases == {"lm_head.weight": "wte.weight"} and snap.meta == {"config_hash": "abc"}


def test_stager_never_overwrites_a_snapshot_that_is_still_alive():
    """A preemption while the previous save is being written: that checkpoint must keep its own step."""
    stager, state = checkpoint.Stager(), live_state()
    writing = staged(stager, state, step=5)
    state["model"]["wte.weight"].add_(1.0)
    emergency = staged(stager, state, step=6)
    assert torch.equal(writing.model["wte.weight"], torch.full((4, 3), 1.0))
    assert torch.equal(emergency.model["wte.weight"], torch.full((4, 3), 2.0))
    assert emergency.model["wte.weight"].data_ptr() != writing.model["wte.weight"].data_ptr()
    kept = writing.model["wte.weight"].data_ptr()
    del writing, emergency
    assert staged(stager, state).model["wte.weight"].data_ptr() == kept  # the kept buffers are back


def test_staged_snapshots_round_trip(tmp_path):
    stager, state = checkpoint.Stager(), live_state()
    for step, value in ((1, 1.0), (2, 3.0)):
        state["model"]["wte.weight"].fill_(value)
        path = checkpoint.write(staged(stager, state, step), tmp_path)
        model, optim, trainer, manifest = checkpoint.load(path)
        assert torch.equal(model["lm_head.weight"], torch.full((4, 3), value)) and torch.equal(
            model["b"], torch.zeros(3)
        )
        assert manifest["aliases"] == {"lm_head.weight": "wte.weight"}
        assert torch.equal(optim["state"][0]["exp_avg"], torch.ones(2))
        assert optim["param_groups"] == [{"lr": 0.1, "params": [0]}] and trainer["step"] == 5
        assert torch.equal(trainer["rng"]["cpu"], state["trainer"]["rng"]["cpu"])
    assert stager.reused


def test_pipeline_write_in_flight_keeps_its_snapshot_and_frees_the_buffers(tmp_path, monkeypatch):
    """Through the real Checkpointer: a snapshot taken during a write (the emergency path does not wait for
    it) goes elsewhere, and once the write is done nothing holds the buffers: the next save reuses them."""
    release, real_write = threading.Event(), checkpoint.write

    def slow_write(snap, root):
        assert release.wait(10)
        return real_write(snap, root)

    monkeypatch.setattr(pipeline.checkpoint, "write", slow_write)
    stager, state, ptrs = checkpoint.Stager(), live_state(), []

    def snapshot_fn(step):
        def take():
            snap = staged(stager, state, step)
            ptrs.append(snap.model["wte.weight"].data_ptr())
            return snap

        return take

    saver = Checkpointer(CheckpointConfig(keep_last=3), tmp_path)
    saver.save(snapshot_fn(1))
    state["model"]["wte.weight"].fill_(9.0)
    snapshot_fn(2)()  # while step 1 is still being written
    release.set()
    saver.save(snapshot_fn(3), wait=True)
    saver.close()
    assert ptrs[0] != ptrs[1] and ptrs[2] == ptrs[0]
    assert torch.equal(
        checkpoint.load(checkpoint.step_dir(tmp_path, 1))[0]["wte.weight"], torch.full((4, 3), 1.0)
    )
    assert torch.equal(
        checkpoint.load(checkpoint.step_dir(tmp_path, 3))[0]["wte.weight"], torch.full((4, 3), 9.0)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stager_pins_the_buffers_of_cuda_tensors():
    stager, state = checkpoint.Stager(), live_state()
    state["model"] = {k: t.cuda() for k, t in state["model"].items()}
    state["optimizer"]["state"][0]["exp_avg"] = torch.randn(1 << 20, device="cuda")
    snap = staged(stager, state)
    moment = snap.optimizer["state"][0]["exp_avg"]
    assert moment.device.type == "cpu" and moment.is_pinned() and snap.model["b"].is_pinned()
    assert torch.equal(
        moment, state["optimizer"]["state"][0]["exp_avg"].cpu()
    )  # complete: the wait covered it
    assert not snap.trainer["rng"]["cpu"].is_pinned()  # CPU state needs no pinning
