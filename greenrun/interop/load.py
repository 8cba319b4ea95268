"""A trained run opened for reading: its saved config, one verified checkpoint, its weights and its tokens.

Everything read is data: config.yaml through config.load_yaml (nothing in it is resolved), the manifest as
JSON, the weights through safetensors; nothing here unpickles, so the optimizer and trainer state are not even
opened. An s3:// run comes down as `greenrun resume s3://…` brings it (runs.find, then under the local
directory's lock its config, the checkpoint and the token cache), into ./runs/<run id> or run.dir=.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from greenrun import config, data, runs
from greenrun.ckpt import checkpoint, sharded
from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.config import Config, ConfigError
from greenrun.core.fs import atomic_write
from greenrun.storage import ObjectNotFound
from greenrun.train import model

log = logging.getLogger(__name__)


@dataclass
class Opened:
    cfg: Config  # the run's saved config, with this command line's data.cache_dir, storage.*, run.dir
    run_dir: Path  # the local run directory (an s3:// run's is where it came down)
    checkpoint: Path  # the verified step directory
    step: int
    manifest: dict
    url: str = ""  # the s3:// URL it came from ("" for a local run directory)


def open_run(target: str, step: int | None = None, overrides: list[str] | None = None) -> Opened:
    """RUN_DIR or s3://bucket/prefix/run at checkpoint `step` (None: its newest valid one).

    `overrides`: the keys that say where its files are here (interop.options.READ_KEYS), checked first.
    """
    overrides = list(overrides or [])
    if problems := config.check_overrides(overrides):
        raise ConfigError(problems)
    if target.startswith("s3://"):
        found = runs.find(target, overrides)
        with runs.hold(found.local_dir):  # the run's one writer: a training there is not raced
            path = _fetch(found, step)
        cfg, run_dir = config.apply_overrides(found.saved, found.overrides), found.local_dir
    else:
        run_dir = Path(target)
        saved_path = runs.saved_config_path(run_dir)
        cfg = config.apply_overrides(config.load_yaml(saved_path), overrides)
        try:
            path = _local_checkpoint(run_dir / "checkpoints", step)
        except CheckpointError as e:
            if cfg.storage.kind != "s3":
                raise
            parts = [cfg.storage.bucket, cfg.storage.prefix.strip("/"), run_dir.resolve().name]
            url = "s3://" + "/".join(p for p in parts if p)
            raise CheckpointError(f"{e}; the run is mirrored to its bucket: try {url}") from None
    manifest = checkpoint.read_manifest(path)
    url = target if target.startswith("s3://") else ""
    return Opened(cfg, run_dir, path, int(manifest.get("step", 0)), manifest, url)


def _no_such_step(step: int, where: str, steps: list[int]) -> ConfigError:
    have = ", ".join(map(str, sorted(steps))) if steps else "none"
    return ConfigError(
        [
            f"step={step}: {where} has no committed checkpoint at that step (committed steps: {have}); pick one of them"
        ]
    )


def _local_checkpoint(root: Path, step: int | None) -> Path:
    if step is None:
        path = checkpoint.latest_valid(root, warn=log.warning)
        if path is None:
            raise CheckpointError(f"no valid checkpoint under {root}")
        return path
    committed = {int(p.name.removeprefix("step-")): p for p in checkpoint.committed(root)}
    if step not in committed:
        raise _no_such_step(step, str(root), list(committed))
    if problem := checkpoint.verify(committed[step]):
        raise CheckpointError(problem)
    return committed[step]


def _fetch(found: runs.Found, step: int | None) -> Path:
    """The newest valid checkpoint as `resume` restores it; a given step, downloaded and verified alike."""
    if step is None:
        runs.restore(found)
        path = checkpoint.latest_valid(found.local_dir / "checkpoints", warn=log.warning)
        assert path is not None  # restore raised otherwise
        return path
    if step not in (steps := found.remote.steps()):
        raise _no_such_step(step, found.url, steps)
    found.local_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(found.local_dir / "config.yaml", config.to_yaml(found.saved))
    path = found.remote.fetch(step, found.local_dir / "checkpoints")
    key16 = checkpoint.read_manifest(path).get("data_cache_key", "")[:16]
    if key16:
        cache_dir = config.apply_overrides(found.saved, found.overrides).data.cache_dir
        try:
            found.remote.download_data_cache(key16, Path(cache_dir).expanduser())
        except ObjectNotFound as e:
            log.warning(f"{e}: its tokenizer is then missing here")
    return path


# --- what a checkpoint holds ------------------------------------------------------------------------------


def model_state(opened: Opened) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights by greenrun's names (tied tensors under each name); safetensors only."""
    if sharded.is_sharded(opened.manifest):  # every rank's safetensors shards, read into full tensors here
        full = sharded.load_full(opened.checkpoint, prefix="model.")
        state = {k.removeprefix("model."): v for k, v in full.items()}
    else:
        state = load_file(str(opened.checkpoint / "model.safetensors"))
    for alias, target in opened.manifest.get("aliases", {}).items():
        state[alias] = state[target]
    # fp8.lm_head's head is wte.weight itself under a second name: the plain model has only the first.
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


def build_model(opened: Opened, device: torch.device | str = "cpu") -> model.GPT:
    """greenrun's GPT of the run's model.* with the checkpoint's weights, in eval mode."""
    net = model.GPT(opened.cfg.model)
    try:
        net.load_state_dict(model_state(opened))
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise CheckpointError(
            f"{opened.checkpoint}: its weights do not fit the model.* of its config.yaml ({first[0].strip()})"
        ) from None
    return net.to(device).eval()


def tokens(opened: Opened) -> data.Dataset:
    """The token cache the checkpoint trained on (its tokenizer.json), or how to get it here."""
    cache = runs.tokens_here(opened.cfg, opened.manifest)
    if cache is not None:
        return data.Dataset(cache)
    key16 = opened.manifest.get("data_cache_key", "")[:16] or "(not recorded)"
    bucket = (
        f"{opened.url} does not hold it either"
        if opened.url
        else "for a run mirrored to S3, pass its s3:// URL instead, which brings the cache down"
    )
    raise ConfigError(
        [
            f"{opened.checkpoint}: the tokenizer is in the run's token cache {key16}, which is not under "
            f"data.cache_dir={opened.cfg.data.cache_dir}. Pass data.cache_dir=DIR naming the folder that holds "
            f"{key16}/ (copy it from the machine that trained); {bucket}"
        ]
    )
