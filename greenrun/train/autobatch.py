"""``trainer.micro_batch_size=auto``: the largest micro-batch that fits, with the global batch kept.

Reads top to bottom: the global-batch arithmetic (pure), the OOM probe (doubling, then bisection, of
real training steps), the safety margin, a throwaway model to probe with, and ``auto_micro_batch``,
the one call the trainer makes. On CPU nothing is probed: RAM is large and swapping so slow that
"does it fit" is better answered by ``greenrun.train.memory``'s analytic estimate.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from greenrun.runtime import distributed
from greenrun.train import activation_checkpointing, memory, model, optimizer, precision

logger = logging.getLogger(__name__)

MAX_MICRO_BATCH = 1024  # probe ceiling: far past the point where a bigger micro-step adds GPU throughput
CPU_CAP = 64  # CPU steps are slow enough that a bigger micro-batch buys nothing
CPU_DEFAULT = 8  # on CPU when neither an estimate nor the free RAM is known


def global_batch_plan(
    target_tokens_per_step: int, micro_batch: int, seq_len: int, world_size: int
) -> tuple[int, int, int]:
    """(micro_batch, grad_accum_steps, actual tokens per step): closest to the target, micro <= given.

    The global batch is a hyperparameter the LR schedule was tuned for, so the micro-batch gives way:
    accum = ceil(target / (micro x seq x world)), then the micro-batch is lowered to an exact split when
    one exists. An exact split needing under half the micro-batch of the best inexact one is refused (a
    prime number of sequences would mean micro-batch 1): a few percent of batch-size deviation costs far
    less than a GPU running tiny micro-steps. The caller reports the deviation.
    """
    if min(target_tokens_per_step, micro_batch, seq_len, world_size) < 1:
        raise ValueError("target_tokens_per_step, micro_batch, seq_len and world_size must all be >= 1")
    target, row = target_tokens_per_step, seq_len * world_size  # row: one more sequence on every rank
    accum = math.ceil(target / (micro_batch * row))
    low = max(1, target // (accum * row))
    # accum was rounded up, so the ideal target / (accum x row) is <= micro_batch: take the nearer of its
    # integer neighbours (capped there), a tie going to the larger, which uses the memory the probe found.
    inexact = min({low, min(low + 1, micro_batch)}, key=lambda m: (abs(m * accum * row - target), -m))
    if target % row == 0:
        rows = target // row  # sequences per device per step
        for m in range(min(micro_batch, rows), (inexact + 1) // 2 - 1, -1):
            if rows % m == 0:
                return m, rows // m, target
    return inexact, accum, inexact * accum * row


# --- Probing -----------------------------------------------------------------------------------------


@dataclass
class Probe:
    micro_batch: int
    ok: bool  # False: it ran out of memory
    seconds: float  # wall time of the step (the first one includes CUDA and allocator warm-up)
    peak_bytes: int | None  # CUDA peak allocated during the step; None off CUDA


@dataclass
class ProbeResult:
    best: int  # largest micro-batch that ran; 0 when even 1 ran out of memory
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "converged"  # converged | limit | time budget | probe cap


def is_oom_error(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError from 2.5 on and also exists on 2.4; some
    # extension and compiled kernels still report an OOM as a plain RuntimeError.
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _cuda_live() -> bool:
    # Never initialise CUDA just to read statistics: that alone costs ~0.5 GiB and seconds.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def free_device_memory() -> None:
    """Hand a failed step's blocks back so the next probe starts from the same floor."""
    gc.collect()  # autograd graphs can sit in reference cycles that only the collector frees
    if _cuda_live():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def probe(
    step_fn: Callable[[int], None],
    start: int,
    limit: int,
    *,
    is_oom: Callable[[BaseException], bool] = is_oom_error,
    cleanup: Callable[[], None] = free_device_memory,
    max_seconds: float = 60.0,
    max_probes: int = 24,
    clock: Callable[[], float] = time.perf_counter,
) -> ProbeResult:
    """Largest micro-batch in [1, limit] for which ``step_fn(mb)``, one real training step, fits.

    Doubles from ``start`` until a step runs out of memory, then bisects between the last success and
    the first failure until the gap is <= 1/8 of the success: the answer is never above the true
    maximum and less than 12.5% below it. The time budget is checked before each probe (one slow probe
    can overrun it) and only once something has fitted, since 0 would leave the run nothing to train with.
    """
    result, t0 = ProbeResult(best=0), clock()
    ok_max, fail_min = 0, limit + 1  # largest success, smallest failure
    mb = max(1, min(start, limit))
    while True:
        if ok_max and clock() - t0 >= max_seconds:
            result.stopped = "time budget"
            break
        if len(result.probes) >= max_probes:
            result.stopped = "probe cap"
            break
        if _cuda_live():
            torch.cuda.reset_peak_memory_stats()
        began, ok = clock(), True
        try:
            step_fn(mb)
        except BaseException as exc:
            if not is_oom(exc):
                raise
            ok = False
        # Cleanup runs after the except block on purpose: the exception's traceback holds the failed
        # step's frames and through them its activations, and Python only drops it when the block ends.
        peak = torch.cuda.max_memory_allocated() if _cuda_live() else None
        result.probes.append(Probe(mb, ok, clock() - began, peak))
        if ok:
            ok_max = mb
        else:
            fail_min = mb
            cleanup()
        if fail_min > limit:  # nothing has failed yet: keep doubling
            if mb == limit:
                result.stopped = "limit"
                break
            mb = min(2 * mb, limit)
            continue
        if fail_min - ok_max <= max(1, ok_max / 8):
            break
        mb = (ok_max + fail_min) // 2
    result.best, result.seconds = ok_max, clock() - t0
    return result


def with_margin(mb: int, margin: float = 0.9) -> int:
    """floor(mb x margin), at least 1.

    The probe measures a few fresh steps; a long run also meets allocator fragmentation, evaluation and
    checkpoint spikes, DDP and NCCL buffers, and torch.compile's own memory plan. Activations grow with
    the micro-batch, so giving up 10% of it frees at least 10% of the activation memory for those.
    """
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    return max(1, math.floor(mb * margin + 1e-9))  # the epsilon keeps 0.9 x 30 from landing on 26.99..


# --- What the probe runs, and the trainer's entry point ------------------------------------------------


@dataclass
class ThrowawaySteps:
    """``make_step`` for ``auto_micro_batch``: real steps on a model and optimizer of its own.

    ``build()`` returns (model, optimizer) set up like the real run's (same recompute plan and optimizer,
    whose state then appears at the first step as in training); ``model(x, y)`` returns (_, loss). It is
    built at the first probe, so probe before the real model exists: the device is then exactly as empty
    as training will find it. Each step runs under a forked RNG, leaving the run's seeded streams alone.
    """

    build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]]
    vocab_size: int
    seq_len: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    parts: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None
    steps_run: int = 0  # completed steps: shows real work was done

    def __call__(self, mb: int) -> Callable[[], None]:
        def step() -> None:
            cuda = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                self.parts = self.parts or self.build()
                model, opt = self.parts
                x = torch.randint(self.vocab_size, (mb, self.seq_len + 1), device=self.device)
                try:
                    with self.autocast():
                        _, loss = model(x[:, :-1], x[:, 1:])
                    loss.backward()
                    opt.step()
                    if cuda:
                        torch.cuda.synchronize(self.device)  # so the probe times the step, not its launch
                    self.steps_run += 1
                finally:
                    opt.zero_grad(set_to_none=True)  # a failed step must not leave gradients behind

        return step

    def close(self) -> None:
        self.parts = None
        free_device_memory()


@dataclass
class AutoBatch:
    micro_batch: int
    grad_accum_steps: int
    tokens_per_step: int  # what one optimizer step really trains on; the note gives the deviation
    probes: list[Probe]
    seconds: float
    note: str


def available_ram() -> int | None:
    """MemAvailable (free + reclaimable page cache) in bytes; None without /proc/meminfo."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_fallback(
    estimate_bytes: Callable[[int], int] | None, limit: int, available_bytes: int | None = None
) -> tuple[int, str]:
    """(micro_batch, note): the largest micro-batch <= min(64, limit) whose estimate fits half the RAM.

    Half, because the data pipeline, tokenizer and page cache need the rest, and a CPU run that swaps is
    slower than any micro-batch can make up for. No estimate or no RAM figure: a fixed CPU_DEFAULT.
    """
    cap = max(1, min(CPU_CAP, limit))
    available = available_ram() if available_bytes is None else available_bytes
    if estimate_bytes is None or available is None:
        return min(CPU_DEFAULT, cap), f"cpu, no memory estimate: fixed micro-batch {min(CPU_DEFAULT, cap)}"
    budget = available // 2
    fits = [mb for mb in range(1, cap + 1) if estimate_bytes(mb) <= budget]
    mb = fits[-1] if fits else 1
    return mb, f"cpu: estimate fits micro-batch {mb} in {budget / 2**30:.1f} GiB (cap {cap})"


def auto_micro_batch(
    make_step: Callable[[int], Callable[[], None]],
    seq_len: int,
    target_tokens: int,
    world_size: int,
    device: torch.device | str,
    log: Callable[[str], None] = logger.info,
    *,
    estimate_bytes: Callable[[int], int] | None = None,
    start: int = 1,
    max_seconds: float = 60.0,
    margin: float = 0.9,
    agree: Callable[[int], int] = lambda mb: mb,
    probe_cpu: bool = False,
) -> AutoBatch:
    """Micro-batch and accumulation for ``target_tokens`` per optimizer step.

    ``make_step(mb)`` returns a closure running one real training step at micro-batch mb (e.g.
    ``ThrowawaySteps``); ``estimate_bytes(mb)`` is the analytic peak, used on CPU; ``agree`` must give
    every rank the same answer (a MIN all-reduce under DDP); ``probe_cpu`` probes off CUDA too (tests).
    """
    t0 = time.perf_counter()
    rows = math.ceil(target_tokens / (seq_len * world_size))  # sequences per device per step
    probes: list[Probe] = []
    if torch.device(device).type != "cuda" and not probe_cpu:
        mb, note = cpu_fallback(estimate_bytes, rows)
    else:
        # Probe a little past one step's worth, so after the margin a single micro-step can still fit.
        limit = min(MAX_MICRO_BATCH, math.ceil(rows / margin))
        result = probe(lambda m: make_step(m)(), start, limit, max_seconds=max_seconds)
        probes, best = result.probes, agree(result.best)
        if best < 1:
            raise RuntimeError(
                "trainer.micro_batch_size=auto: even micro-batch 1 runs out of memory; enable "
                "activation_checkpointing, use precision=bf16 or pick a smaller model"
            )
        safe = with_margin(best, margin)
        # Multiples of 8 from 16 up tile evenly on tensor cores, but no accumulation at all is worth more.
        mb = min(rows, safe) if safe >= rows or safe < 16 else safe // 8 * 8
        note = (
            f"{len(probes)} probes in {result.seconds:.1f} s ({result.stopped}): max {best}, margin -> {safe}"
        )
    micro, accum, tokens = global_batch_plan(target_tokens, mb, seq_len, world_size)
    note += f"; {micro} x {accum} accum = {tokens} tokens/step ({tokens / target_tokens - 1:+.2%} vs target)"
    log(f"auto micro-batch: {note}")
    return AutoBatch(micro, accum, tokens, probes, time.perf_counter() - t0, note)


def resolve(cfg: Any, device: torch.device, world_size: int, log: Callable[[str], None]) -> AutoBatch:
    """The probed micro-batch and accumulation for `cfg`'s trainer.micro_batch_size=auto; cfg is not changed.

    `cfg` is a greenrun.config.Config, which sits a layer above this package, hence untyped here.

    Runs on a throwaway model before the real one exists; the resolved numbers go into config.yaml, so a
    resume reuses them instead of probing again (a different split would change the batches).
    """
    t = cfg.trainer

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        m = model.GPT(cfg.model).to(device)
        activation_checkpointing.apply(m, cfg.activation_checkpointing)
        return m, optimizer.build(cfg.optimizer, m)

    recompute = activation_checkpointing.plan(cfg.activation_checkpointing, cfg.model.n_layer)
    steps = ThrowawaySteps(
        build,
        cfg.model.vocab_size,
        cfg.model.seq_len,
        device,
        lambda: precision.get(cfg.precision.name).autocast(device),
    )
    try:
        choice = auto_micro_batch(
            steps,
            cfg.model.seq_len,
            t.global_batch_tokens,
            world_size,
            device,
            log,
            agree=distributed.min_int,
            estimate_bytes=lambda mb: (
                memory.estimate(
                    cfg.model, mb, cfg.model.seq_len, cfg.precision.name, recompute, cfg.optimizer.name
                ).total
            ),
        )
    finally:
        steps.close()
    return choice
