import json

import pytest
import torch

from greenrun.ckpt import checkpoint


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
