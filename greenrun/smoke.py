"""`greenrun smoke`: the real configuration for two optimizer steps on the CPU, before any GPU is rented.

It runs the real data pipeline, the configured architecture (widths, heads, vocabulary), forward, backward,
optimizer step and a checkpoint write/read round trip; only micro-batch and sequence length shrink. A model
whose fp32 training state would not fit in this machine's memory is depth-reduced, and the report says so.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from greenrun.ckpt import checkpoint
from greenrun.config import Config
from greenrun.core.output import Reporter
from greenrun.data import DataError
from greenrun.runtime import distributed
from greenrun.train import activation_checkpointing, memory, model, precision

SMOKE_MICRO_BATCH = 2  # sequences per micro-batch on the CPU
SMOKE_SEQ_LEN = 64  # tokens per sequence on the CPU
BYTES_PER_PARAM_CPU = 16  # fp32 weights + grads + two AdamW moments
RAM_SHARE = 0.5  # share of available memory the smoke run may take


@dataclass
class SmokeResult:
    passed: bool
    reason: str  # why it failed, or "" on a pass
    params: int  # parameters of the full configured model
    layers_run: int  # blocks actually run (fewer than configured when depth-reduced)
    estimate: memory.MemoryEstimate | None  # predicted peak per device for the full config
    seconds: float
    losses: list[float] = field(default_factory=list)
    capacity: tuple[str, int] | None = None  # (target device, its memory in bytes)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def smoke_config(cfg: Config, n_layer: int) -> Config:
    """The same config shrunk to two CPU steps: same widths, heads and vocabulary."""
    t = cfg.trainer
    stand_in = precision.get(cfg.precision.name).cpu_stand_in  # for precisions whose kernels need a GPU
    return dataclasses.replace(
        cfg,
        precision=dataclasses.replace(cfg.precision, name=stand_in),
        model=dataclasses.replace(cfg.model, n_layer=n_layer, seq_len=min(cfg.model.seq_len, SMOKE_SEQ_LEN)),
        trainer=dataclasses.replace(
            t,
            device="cpu",
            micro_batch_size=min(t.micro_batch_size, SMOKE_MICRO_BATCH)
            if isinstance(t.micro_batch_size, int)
            else SMOKE_MICRO_BATCH,
            grad_accum_steps=1,
            max_steps=2,
            stop_at_step=None,
            compile=False,
            eval_batches=1,
            sample_tokens=0,
        ),
        checkpoint=dataclasses.replace(cfg.checkpoint, interval=0, keep_last=1),
    )


def run(cfg: Config) -> SmokeResult:
    from greenrun.trainer import Trainer  # trainer pulls in the whole stack; keep `import smoke` light

    t0 = time.perf_counter()
    params = model.count_params(cfg.model, non_embedding=False)
    target = distributed.resolve_device(cfg.trainer.device)
    estimate = _estimate(cfg, target)
    n_layer = cfg.model.n_layer
    if params * BYTES_PER_PARAM_CPU > RAM_SHARE * available_ram():
        per_block = max(1, model.count_params(dataclasses.replace(cfg.model, n_layer=1), non_embedding=True))
        room = RAM_SHARE * available_ram() / BYTES_PER_PARAM_CPU - (params - per_block * n_layer)
        n_layer = int(max(1, min(2, room // per_block)))
    small = smoke_config(cfg, n_layer)
    capacity = _capacity(target)
    trainer = None
    try:
        with tempfile.TemporaryDirectory(prefix="greenrun-smoke-") as tmp:
            cpu = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
            trainer = Trainer(small, Path(tmp), reporter=Reporter(enabled=False), dist=cpu)
            losses = [trainer.train_step()["loss"] for _ in range(2)]
            if not all(map(_finite, losses)):
                return SmokeResult(
                    False, f"loss is not finite: {losses}", params, n_layer, estimate, _since(t0)
                )
            written = checkpoint.write(trainer.snapshot(), Path(tmp) / "checkpoints")
            model_state, _, trainer_state, _ = checkpoint.load(written)
            for name, tensor in trainer.model.state_dict().items():
                if not torch.equal(tensor, model_state[name]):
                    return SmokeResult(
                        False, f"checkpoint round trip changed {name}", params, n_layer, estimate, _since(t0)
                    )
            if trainer_state["step"] != 2:
                return SmokeResult(
                    False, "checkpoint round trip lost the step", params, n_layer, estimate, _since(t0)
                )
            return SmokeResult(True, "", params, n_layer, estimate, _since(t0), losses, capacity)
    except DataError:
        raise  # bad input, not a failed check: the CLI reports it with exit 2
    except MemoryError:
        return SmokeResult(False, "out of CPU memory", params, n_layer, estimate, _since(t0))
    except Exception as e:  # the point of a smoke test: report any failure as a reason, not a traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        reason = f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
        return SmokeResult(False, reason, params, n_layer, estimate, _since(t0))
    finally:
        if trainer is not None:
            trainer.close()


def _estimate(cfg: Config, device: torch.device) -> memory.MemoryEstimate | None:
    mb = cfg.trainer.micro_batch_size
    if not isinstance(mb, int):
        return None
    plan = activation_checkpointing.plan(cfg.activation_checkpointing, cfg.model.n_layer)
    return memory.estimate(
        cfg.model,
        micro_batch=mb,
        seq_len=cfg.model.seq_len,
        precision=cfg.precision.name,
        recompute=plan,
        optimizer=cfg.optimizer.name,
        loss_chunk=cfg.model.loss_chunk,
    )


def _capacity(device: torch.device) -> tuple[str, int] | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None  # a GPU config checked on a CPU: the target's memory is not known here
        props = torch.cuda.get_device_properties(device)
        return props.name, props.total_memory
    return "this machine's RAM", available_ram()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def print_result(result: SmokeResult, cfg: Config, reporter: Reporter) -> None:
    c = reporter.console
    status = "[bold green]PASS[/bold green]" if result.passed else "[bold red]FAIL[/bold red]"
    c.print(f"smoke {status} in {result.seconds:.1f} s: model={cfg.model.name}, {result.params:,} parameters")
    stand_in = precision.get(cfg.precision.name).cpu_stand_in
    if stand_in != cfg.precision.name:
        c.print(f"  {cfg.precision.name} ran as {stand_in} on the CPU (its own kernels need a GPU)")
    if result.layers_run < cfg.model.n_layer:
        c.print(
            f"  depth-reduced to {result.layers_run} of {cfg.model.n_layer} blocks: the full fp32 training state "
            f"({result.params * BYTES_PER_PARAM_CPU / 2**30:.1f} GiB) would not fit in this machine's memory; "
            "every block has the same shape, so the check still covers them"
        )
    if result.losses:
        c.print(f"  losses: {', '.join(f'{x:.4f}' for x in result.losses)}")
    if not result.passed:
        c.print(f"  reason: {result.reason}", markup=False)
    if result.estimate is not None:
        mb = cfg.trainer.micro_batch_size
        c.print(
            f"  predicted peak training memory per device (full config: micro-batch {mb} x {cfg.model.seq_len} "
            f"tokens, {cfg.precision.name}, checkpointing {cfg.activation_checkpointing.policy}):"
        )
        for name, value in result.estimate.table():
            c.print(f"    {name:<18} {value}")
        if result.capacity is not None:
            where, size = result.capacity
            total = result.estimate.total
            if total <= size:
                c.print(f"  fits: {total / 2**30:.1f} of {size / 2**30:.1f} GiB on {where}")
            else:
                c.print(
                    f"  [yellow]does not fit: {total / 2**30:.1f} GiB needed, {size / 2**30:.1f} GiB on {where}; "
                    "lower trainer.micro_batch_size (raise grad_accum_steps to keep the batch), use precision=bf16 "
                    "or activation_checkpointing=full[/yellow]"
                )
