"""Process-group setup for torchrun (NCCL on GPU, gloo on CPU; a single process needs none of it), and the
checks of the launcher's keys (trainer.nproc_per_node, nnodes, rdzv_endpoint, max_restarts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int  # global rank of this process
    world_size: int  # processes in the job
    local_rank: int  # rank on this machine: picks the GPU
    device: torch.device  # where this process trains

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_pref: str) -> Dist:
    """Join the torchrun job if WORLD_SIZE > 1, else describe the lone process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def teardown(together: bool = False) -> None:
    """Leave the process group. `together` (a normal end, every rank on its way out) waits for all ranks first:
    a gloo rank that destroys its group while a peer still holds the connection is aborted at exit now and then
    ("terminate called without an active exception": 1 run in 10 on 2 CPU ranks, none in 25 with the barrier).
    After a failure there is no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def mean(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar tensor over all ranks (identity in a single process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:
            value /= dist.get_world_size()
    return value


def total(value: torch.Tensor) -> torch.Tensor:
    """Sum a scalar tensor over all ranks (identity in a single process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_flag(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must agree before stopping or checkpointing."""
    if not dist.is_initialized():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def min_int(value: int) -> int:
    """The smallest of each rank's value (auto micro-batch: the tightest GPU decides)."""
    if not dist.is_initialized():
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# --- the launcher's keys -------------------------------------------------------------------------------


def node_range(nnodes: str) -> tuple[int, int] | None:
    """trainer.nnodes as (min, max) machines: "2" -> (2, 2), "1:4" -> (1, 4); None when it is neither."""
    low, sep, high = str(nnodes).strip().partition(":")
    try:
        span = (int(low), int(high) if sep else int(low))
    except ValueError:
        return None
    return span if 1 <= span[0] <= span[1] else None


def launch_problems(nproc_per_node: Any, nnodes: str, rdzv_endpoint: str, max_restarts: int) -> list[str]:
    """The launcher's keys (trainer.*, used by greenrun.launch): how many processes and machines, where they
    meet, how often the group restarts."""
    problems = []
    n = nproc_per_node
    if n != "auto" and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        problems.append(f"trainer.nproc_per_node: must be a positive integer or auto, got {n!r}")
    span = node_range(nnodes)
    if span is None:
        problems.append(
            f"trainer.nnodes: must be a number of machines N >= 1 or a range MIN:MAX, got {nnodes!r}"
        )
    host, sep, port = rdzv_endpoint.rpartition(":")
    if rdzv_endpoint and not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        problems.append(f"trainer.rdzv_endpoint: must be host:port (e.g. node0:29500), got {rdzv_endpoint!r}")
    elif span is not None and span[1] > 1 and not rdzv_endpoint:
        problems.append(
            f"trainer.nnodes={nnodes} needs trainer.rdzv_endpoint=HOST:PORT, the same on every machine "
            "(e.g. the first machine's name and a free port: node0:29500)"
        )
    if max_restarts < 0:
        problems.append(f"trainer.max_restarts: must be >= 0, got {max_restarts}")
    return problems
