"""Snapshots: the training state copied off the device, so that writing can happen while training continues.

The copy is the only part of a save the training loop waits for. Fresh pageable copies of GPT-2 124M (1.5 GB of
weights and AdamW moments) blocked an H200 run 1.24 s at the first save and 0.49 s at each later one: every save
page-faulted new memory in, and a copy from the GPU into pageable memory is synchronous and goes through the
driver's bounce buffer. A Stager allocates the host buffers once, one per tensor of the state tree (keyed by its
path in the tree), and every later save copies into the same buffers. Buffers of CUDA tensors are pinned, so
each copy is one DMA queued with non_blocking=True, and one wait on the stream at the end makes the snapshot a
consistent copy of this step before any writer thread sees it.

A Snapshot staged into the buffers owns them for as long as the Snapshot object lives. Its writers hold the
object and drop it when they are done (the pipeline's background thread once checkpoint.write returns; the
emergency save once it has rendered the files). The stager reuses the buffers only once that Snapshot is gone;
a snapshot taken while it lives - a preemption while the previous save is still being written, which the
emergency path deliberately does not wait for - is copied into fresh memory instead, never over a checkpoint
being written.

The buffers are allocated by the first snapshot (AdamW's moments only exist after the first optimizer step), or
earlier by reserve(). Pinned ones come from PyTorch's pinned allocator, which rounds each block up to a power of
two: up to twice the staged bytes stay locked in host memory (scripts/bench_staging.py reports both).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights share storage; safetensors refuses that, so keep one name and record the aliases."""
    first: dict[tuple[int, int, tuple], str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in first:
            aliases[name] = first[ident]
        else:
            first[ident] = name
            unique[name] = t
    return unique, aliases


def to_cpu(obj: Any) -> Any:
    """Deep copy of a state tree with every tensor on the CPU (a real copy: the live tensors keep changing)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    step: int
    model: dict[str, torch.Tensor]
    aliases: dict[str, str]
    optimizer: dict
    trainer: dict
    meta: dict


class Stager:
    """Copies the training state into host buffers it allocates once and reuses (see the module docstring).

    One per training process; only the writer rank ever calls it, so the other ranks allocate nothing.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._lent: weakref.ref[Snapshot] | None = None  # the live Snapshot that holds the buffers
        self._pin = torch.cuda.is_available()  # off after a failed pinned allocation: pageable still works
        self.allocated_bytes = 0  # allocated by the latest snapshot() or reserve() call
        self.pinned_bytes = 0  # pinned by this stager so far (the allocator rounds each block up further)
        self.reused = False  # whether the latest snapshot() went into the kept buffers

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers kept for reuse."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def snapshot(
        self, step: int, model: dict, aliases: dict[str, str], optimizer: dict, trainer: dict, meta: dict
    ) -> Snapshot:
        """A Snapshot of this step: model, optimizer and trainer state copied to the host.

        Non-tensor leaves are kept, inside fresh dicts, lists and tuples (the live containers keep changing).
        """
        free = self._lent is None or self._lent() is None
        if not free:
            log.info(f"step {step}: the previous snapshot is still being written; staging into fresh memory")
        staged = self._stage(_tree(model, optimizer, trainer), keep=free, copy=True)
        snap = Snapshot(step, staged["model"], aliases, staged["optimizer"], staged["trainer"], meta)
        self.reused = free and self.allocated_bytes == 0
        if free:
            self._lent = weakref.ref(snap)
        return snap

    def reserve(self, model: dict, optimizer: dict, trainer: dict) -> int:
        """Allocate the buffers for this state now, copying nothing; returns the bytes allocated.

        Pinning 1.5 GB takes a while: calling this once after the first optimizer step (when the optimizer
        state exists) keeps that cost out of the first save.
        """
        self._stage(_tree(model, optimizer, trainer), keep=True, copy=False)
        return self.allocated_bytes

    def _stage(self, tree: dict, *, keep: bool, copy: bool) -> Any:
        self.allocated_bytes = 0
        seen: set[tuple] = set()
        devices: set[torch.device] = set()

        def tensor(t: torch.Tensor, path: tuple) -> torch.Tensor:
            t = t.detach()
            if type(t) is not torch.Tensor or t.layout != torch.strided or t.is_quantized:
                return t.to("cpu", copy=True)  # subclasses, sparse, quantized: copied as to_cpu does
            buf = self._buffers.get(path) if keep else None
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                # Fresh memory (the kept buffers are lent out) stays pageable: pinning it each time would
                # cost more than the copy, and the pinned allocator would keep a second set for good.
                buf = self._allocate(t, pin=keep)
                if keep:
                    self._buffers[path] = buf
            seen.add(path)
            if copy:
                if t.is_cuda:
                    devices.add(t.device)
                # Into pinned memory this only queues the DMA: the wait below covers all of them at once.
                buf.copy_(t, non_blocking=True)
            return buf

        def walk(obj: Any, path: tuple) -> Any:
            if isinstance(obj, torch.Tensor):
                return tensor(obj, path)
            if isinstance(obj, dict):
                return {k: walk(v, (*path, k)) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return type(obj)(walk(v, (*path, i)) for i, v in enumerate(obj))
            return obj

        staged = walk(tree, ())
        for device in devices:  # the copies were queued on the current stream, after this step's updates
            torch.cuda.current_stream(device).synchronize()
        if keep and copy:  # state that is gone (an optimizer rebuilt with fewer tensors) frees its buffers
            for path in self._buffers.keys() - seen:
                del self._buffers[path]
        if self.allocated_bytes and keep:
            log.debug(
                f"checkpoint staging: allocated {self.allocated_bytes / 2**20:.0f} MiB of host buffers "
                f"({self.pinned_bytes / 2**20:.0f} MiB pinned in all), reused by every later save"
            )
        return staged

    def _allocate(self, t: torch.Tensor, pin: bool) -> torch.Tensor:
        self.allocated_bytes += t.numel() * t.element_size()
        if pin and t.is_cuda and self._pin:
            try:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.pinned_bytes += t.numel() * t.element_size()
                return buf
            except RuntimeError as e:  # the host cannot lock that much memory: slower, but still a copy
                log.warning(f"checkpoint staging: could not pin host memory ({e}); using pageable buffers")
                self._pin = False
        return torch.empty(t.shape, dtype=t.dtype)


def _tree(model: dict, optimizer: dict, trainer: dict) -> dict:
    """The one tree snapshot() and reserve() both walk, so their buffer paths match."""
    return {"model": model, "optimizer": optimizer, "trainer": trainer}
