"""Sharded checkpoints (`distributed.checkpoint=sharded`, fsdp only): every rank writes its own shards.

A sharded checkpoint is `checkpoints/step-N/` holding
  shards/*.safetensors   one file per rank, written by torch.distributed.checkpoint's HuggingFaceStorageWriter:
                         the model and optimizer tensors ("model.<fqn>", "optim.<fqn>.<key>"), each rank's slice
                         with its offsets in the safetensors JSON header
  optimizer_meta.pt      the optimizer's param_groups and non-tensor state (plain containers: weights_only=True)
  trainer.pt             as in a full checkpoint
  manifest.json          as in a full checkpoint, plus "layout": "sharded" - written last, listing every file
DCP's default FileSystemWriter writes a pickled `.metadata`; the HuggingFace writer writes none (the reader
rebuilds it from the safetensors headers), so loading still never unpickles.

The DCP save is a collective on the default process group: it runs in the training thread on every rank, and
no host holds a full copy of the state. Rank 0 then commits (trainer.pt, hashes, manifest, rename) through
checkpoint.Pending.commit, on the checkpointer's background thread. The directory must be one every rank sees.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from greenrun.ckpt.optim_keys import by_position

SHARDS = "shards"
OPTIM_META = "optimizer_meta.pt"
LAYOUT = "sharded"


def is_sharded(manifest: dict) -> bool:
    return manifest.get("layout") == LAYOUT


# --- the flat tensor form DCP writes ----------------------------------------------------------------------


def flatten(msd: dict, osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by flat name, the optimizer's non-tensor parts) of torch's distributed state (keyed by name)."""
    flat = {f"model.{k}": v for k, v in msd.items()}
    rest: dict[str, dict] = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                flat[f"optim.{fqn}.{key}"] = value
            else:
                rest.setdefault(fqn, {})[key] = value
    return flat, {"param_groups": osd["param_groups"], "state": rest}


def unflatten(flat: dict[str, torch.Tensor], optim_meta: dict) -> tuple[dict, dict]:
    """flatten's inverse: (model state, optimizer state keyed by parameter name)."""
    msd = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    state: dict[str, dict] = {fqn: dict(s) for fqn, s in optim_meta["state"].items()}
    for k, v in flat.items():
        if k.startswith("optim."):
            fqn, key = k.removeprefix("optim.").rsplit(".", 1)  # fqns hold dots, optimizer keys do not
            state.setdefault(fqn, {})[key] = v
    return msd, {"state": state, "param_groups": optim_meta["param_groups"]}


# --- save (every rank) ------------------------------------------------------------------------------------


def save(model: nn.Module, optimizer: torch.optim.Optimizer, tmp: Path) -> dict:
    """Every rank: write this rank's shards of the model and optimizer under tmp/shards; the non-tensor
    optimizer parts come back (rank 0 writes them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)  # sharded DTensors: each rank's slice, nothing gathered
    flat, optim_meta = flatten(msd, osd)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    return optim_meta


# --- load -------------------------------------------------------------------------------------------------


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(path / SHARDS))


def load_full(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (those whose flat name starts with prefix) as full CPU tensors, in this
    process alone: no process group is needed, whatever the world size that wrote them."""
    import torch.distributed.checkpoint as dcp

    reader = _reader(path)
    entries = reader.read_metadata().state_dict_metadata
    template = {
        k: torch.empty(md.size, dtype=md.properties.dtype)
        for k, md in entries.items()
        if k.startswith(prefix)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(template, storage_reader=_reader(path), no_dist=True)
    return template


def load_full_state(path: Path, optim_meta: dict) -> tuple[dict, dict]:
    """(model state, optimizer state in torch.optim's positional form): what a full checkpoint holds.
    optim_meta is the checkpoint's OPTIM_META file, loaded by the caller (weights_only)."""
    msd, osd = unflatten(load_full(path), optim_meta)
    names = [n for g in osd["param_groups"] for n in g["params"]]  # torch.optim numbers them in this order
    return msd, by_position(osd, names)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, optim_meta: dict) -> None:
    """Every rank of an fsdp run, on any world size: each reads the slices its own shards cover."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    template, _ = flatten(msd, osd)
    dcp.load(template, storage_reader=_reader(path))  # into the template's DTensors, in place
    msd, osd = unflatten(template, optim_meta)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
