"""How the ranks of a torchrun job share the model: `distributed=ddp` (every rank holds all of it, gradients
all-reduced) or `distributed=fsdp` (FSDP2: `fully_shard` per transformer block and once at the root, so each rank
holds 1/N of the parameters, gradients and optimizer state; each block's weights are all-gathered for its
forward and backward).

A Parallel is built once per Trainer. `shard` runs before the optimizer is built (FSDP2 turns the parameters into
DTensors, and the optimizer must hold those), `wrap` after torch.compile. `sync_grads(train_model, on)` brackets
each micro-step of gradient accumulation, so only the last one reduces gradients.

Checkpoints, `distributed.checkpoint=full` (the default): the state is gathered to full tensors (`full_state_dict`,
in host memory) on rank 0 and written in the one format every layout writes, and an FSDP run loads it by
scattering the full state back into its shards (`set_state_dict`). So a run moves between ddp and fsdp and
between world sizes freely; the price is rank 0's host memory for the whole state at each save (for GPT-2 124M
with AdamW, 1.5 GB). `distributed.checkpoint=sharded` (fsdp only): every rank writes its own shards through
torch.distributed.checkpoint and nothing is gathered (ckpt/sharded.py); fsdp reads them back on any world size,
and one process or ddp reads them into full tensors.

Evaluation and sampling run forwards; under FSDP every forward is a collective, so every rank runs the same
number of them (Trainer.evaluate pads its share; sampling runs on every rank with the same seed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from greenrun.ckpt.optim_keys import by_name, by_position
from greenrun.core.fields import plain
from greenrun.core.registry import Registry

# Elementwise optimizers give the same update on a shard as on the whole tensor; Muon orthogonalises whole
# matrices and Adafactor factors them by rows and columns, so on FSDP's row shards they would change the maths.
FSDP_OPTIMIZERS = ("adamw", "lion", "adamw8bit")
CHECKPOINTS = ("full", "sharded")


@dataclass
class DistributedConfig:
    name: str = plain("ddp")  # ddp (whole model on every rank) | fsdp (parameters, grads and state sharded)
    reshard_after_forward: bool = plain(True)  # fsdp: free each block's gathered weights after its forward
    # sharded: no host holds the whole state, and run.dir must be on a filesystem every rank sees
    checkpoint: str = plain("full")  # full (gathered to rank 0) | sharded (fsdp: each rank writes its shards)


class Parallel:
    """ddp: the model whole on every rank; torch's DistributedDataParallel reduces the gradients."""

    sharded = False

    def __init__(self, cfg: DistributedConfig, world_size: int) -> None:
        self.cfg, self.world_size = cfg, world_size

    @property
    def sharded_checkpoints(self) -> bool:
        """Every rank writes its own shards (fsdp with distributed.checkpoint=sharded); else rank 0 the full state."""
        return self.sharded and self.cfg.checkpoint == "sharded"

    def shard(self, model: nn.Module, param_dtype: torch.dtype | None) -> None:
        """Before the optimizer is built: nothing to do for ddp."""

    def wrap(self, train_model: nn.Module, device: torch.device) -> nn.Module:
        if self.world_size == 1:
            return train_model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    @contextlib.contextmanager
    def sync_grads(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        if on or not hasattr(train_model, "no_sync"):
            yield
        else:
            with train_model.no_sync():
                yield

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict
    ) -> None:
        model.load_state_dict(msd)
        optimizer.load_state_dict(osd)

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()


class Fsdp(Parallel):
    """fsdp: FSDP2's fully_shard on every block, then on the root (embeddings, final norm, tied head)."""

    sharded = True

    def shard(self, model: nn.Module, param_dtype: torch.dtype | None) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Gradients are reduced in fp32 whatever the compute dtype: a bf16 sum over ranks loses the small ones.
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.h:
            fully_shard(block, mp_policy=mp, reshard_after_forward=self.cfg.reshard_after_forward)
        # The root's parameters are needed again at once by the head: keep them gathered after forward.
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)

    def wrap(self, train_model: nn.Module, device: torch.device) -> nn.Module:
        return train_model

    @contextlib.contextmanager
    def sync_grads(self, train_model: nn.Module, on: bool) -> Iterator[None]:
        model = getattr(train_model, "_orig_mod", train_model)  # under torch.compile, the module it wraps
        model.set_requires_gradient_sync(on)
        yield

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Every rank takes part; rank 0 gets the full state in host memory, the others empty dicts.

        The optimizer state comes back keyed by parameter name (torch's distributed form) and is turned into
        torch.optim's own form (keyed by position), the one every greenrun checkpoint holds.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(model, optimizer, options=opts)
        if not msd:
            return {}, {}
        return msd, by_position(osd, param_names(model, optimizer))

    def load_full_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        names = param_names(model, optimizer)
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=by_name(osd, names),
                       options=StateDictOptions(full_state_dict=True))  # fmt: skip

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


PARALLELISMS: Registry[type[Parallel]] = Registry("distributed.name")
PARALLELISMS.add("ddp", Parallel)
PARALLELISMS.add("fsdp", Fsdp)


def build(cfg: DistributedConfig, world_size: int) -> Parallel:
    """The layout for this job; one process holds the whole model whatever distributed.name says."""
    return PARALLELISMS.get(cfg.name if world_size > 1 else "ddp")(cfg, world_size)


def validate(cfg: DistributedConfig, optimizer_name: str, precision_name: str) -> list[str]:
    problems = PARALLELISMS.problems(cfg.name)
    if cfg.checkpoint not in CHECKPOINTS:
        problems.append(f"distributed.checkpoint={cfg.checkpoint}: expected one of {', '.join(CHECKPOINTS)}")
    elif cfg.checkpoint == "sharded" and cfg.name != "fsdp":
        problems.append(
            f"distributed.checkpoint=sharded with distributed={cfg.name}: only fsdp shards the state to write; "
            "use distributed=fsdp, or distributed.checkpoint=full"
        )
    if cfg.name == "fsdp" and optimizer_name not in FSDP_OPTIMIZERS:
        problems.append(
            f"distributed=fsdp with optimizer={optimizer_name}: it works on whole matrices, and FSDP gives each "
            f"rank row shards of them; use distributed=ddp, or one of {', '.join(FSDP_OPTIMIZERS)}"
        )
    if cfg.name == "fsdp" and precision_name not in ("fp32", "bf16"):
        # fp16's loss scaler and torchao's float8 linears each need their own FSDP2 handling, not built here.
        problems.append(
            f"distributed=fsdp with precision={precision_name}: only fp32 and bf16 are supported with fsdp; "
            "use precision=bf16, or distributed=ddp"
        )
    return problems


def param_dtype(precision_name: str) -> torch.dtype | None:
    """The dtype FSDP all-gathers the weights in: bf16 for a bf16 run (half the traffic), else as stored."""
    return torch.bfloat16 if precision_name == "bf16" else None


# --- the two forms of optimizer state ----------------------------------------------------------------------


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer holds, in its order (torch.optim's state keys index it)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
