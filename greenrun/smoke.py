"""`greenrun smoke`: the real configuration for two optimizer steps on the CPU, before any GPU is rented.

It builds the real data splits and checks them against the real sequence length, runs the configured
architecture (widths, heads, vocabulary) forward, backward and through an optimizer step, and round-trips a
checkpoint; only micro-batch and sequence length shrink. A model whose fp32 training state would not fit in
this machine's memory is depth-reduced, and the report says so.

Then it predicts the full config's peak memory per device (greenrun.train.memory) and holds it against the
target device (`smoke.target`, greenrun.train.target): a prediction that does not fit FAILs, and the report
gives each lever that exists (micro-batch, checkpointing policy, precision, optimizer) with the peak it would
predict. A config that trains on a GPU runs its two CPU steps in fp32 when this CPU's half-precision matmuls
are slower than its fp32 ones (most CPUs without native bf16; fp16 everywhere): CPU autocast does not test the
GPU's kernels, and emulated it costs minutes. The memory prediction stays the configured precision's.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from greenrun import data, fit
from greenrun.ckpt import checkpoint, emergency
from greenrun.config import Config
from greenrun.core.output import Reporter
from greenrun.data import DataError
from greenrun.runtime import distributed, hardware
from greenrun.train import memory, model, precision, target
from greenrun.train.target import Target

SMOKE_MICRO_BATCH = 2  # sequences per micro-batch on the CPU
SMOKE_SEQ_LEN = 64  # tokens per sequence on the CPU
BYTES_PER_PARAM_CPU = 16  # fp32 weights + grads + two AdamW moments
RAM_SHARE = 0.5  # share of available memory the smoke run may take
FP32 = "fp32"  # what the CPU steps of a GPU config run in


@dataclass
class SmokeResult:
    passed: bool
    reason: str  # why it failed, or "" on a pass
    params: int  # parameters of the full configured model
    layers_run: int  # blocks actually run (fewer than configured when depth-reduced)
    estimate: memory.MemoryEstimate | None  # predicted peak per device for the full config
    seconds: float
    losses: list[float] = field(default_factory=list)
    target: Target | None = None  # the device the estimate is held against
    levers: list[fit.Lever] = field(
        default_factory=list
    )  # when it does not fit: what each lever would predict
    ran_as: str = ""  # the precision the CPU steps ran in
    ran_as_why: str = ""  # why that one, when it is not the configured precision
    steps_failed: str = ""  # why the two CPU steps failed ("" when they passed; memory aside)


def available_ram() -> int:
    return target.ram()


def cpu_precision(cfg: Config, on_gpu: bool) -> tuple[str, str]:
    """(precision, why) for the two CPU steps: the configured precision's CPU stand-in (itself, or bf16 for
    fp8), except for a run that trains on a GPU, whose autocast precision runs as fp32 where this CPU's
    half-precision matmuls are slower than its fp32 ones (measured now, ~0.1 s): CPU autocast does not test the
    GPU's kernels anyway, and emulated half precision can take minutes where fp32 takes seconds."""
    name = cfg.precision.name
    stand_in = precision.get(name).cpu_stand_in
    why = "" if stand_in == name else "its own kernels need a GPU"
    dtype = precision.get(stand_in).autocast_dtype
    if not on_gpu or dtype is None:
        return stand_in, why
    fp32, half = hardware.matmul_rates(dtype)
    if half >= fp32:
        return stand_in, why
    return FP32, (
        f"the run trains on a GPU, and {stand_in} matmuls run at {half / fp32:.2g}x fp32's speed here "
        f"({half:.0f} vs {fp32:.0f} GFLOP/s, measured now)"
    )


def smoke_config(cfg: Config, n_layer: int, run_as: str | None = None) -> Config:
    """The same config shrunk to two CPU steps: same widths, heads and vocabulary; precision `run_as` (default:
    the configured precision's CPU stand-in)."""
    t = cfg.trainer
    return dataclasses.replace(
        cfg,
        precision=dataclasses.replace(
            cfg.precision, name=run_as or precision.get(cfg.precision.name).cpu_stand_in
        ),
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
    t0 = time.perf_counter()
    params = model.count_params(cfg.model, non_embedding=False)
    where = target.resolve(cfg.smoke, cfg.trainer.device)
    estimate = fit.estimate(cfg)
    too_big, levers = fit.memory_verdict(cfg, where)
    n_layer = cfg.model.n_layer
    if params * BYTES_PER_PARAM_CPU > RAM_SHARE * available_ram():
        per_block = max(1, model.count_params(dataclasses.replace(cfg.model, n_layer=1), non_embedding=True))
        room = RAM_SHARE * available_ram() / BYTES_PER_PARAM_CPU - (params - per_block * n_layer)
        n_layer = int(max(1, min(2, room // per_block)))
    run_as, why = cpu_precision(cfg, where.gpu)
    small = smoke_config(cfg, n_layer, run_as)
    failed, losses = _two_steps(cfg, small)
    reason = "; ".join(r for r in (failed, too_big) if r)
    return SmokeResult(
        not reason,
        reason,
        params,
        n_layer,
        estimate,
        _since(t0),
        losses,
        where,
        levers,
        run_as,
        why,
        failed,
    )


def _two_steps(cfg: Config, small: Config) -> tuple[str, list[float]]:
    """(why the two CPU steps failed or "", their losses): the real data, the small model, a checkpoint."""
    from greenrun.trainer import Trainer  # trainer pulls in the whole stack; keep `import smoke` light

    trainer = None
    try:
        dataset = data.build(cfg.data, cfg.model.vocab_size)
        check_data(dataset, cfg)  # the real seq_len, not the shrunk one: training reads the same splits
        with tempfile.TemporaryDirectory(prefix="greenrun-smoke-") as tmp:
            cpu = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
            trainer = Trainer(small, Path(tmp), reporter=Reporter(enabled=False), dist=cpu, data_set=dataset)
            losses = [trainer.train_step()["loss"] for _ in range(2)]
            if not all(map(_finite, losses)):
                return f"loss is not finite: {losses}", losses
            written = checkpoint.write(trainer.snapshot(), Path(tmp) / "checkpoints")
            model_state, _, trainer_state, _ = checkpoint.load(written)
            for name, tensor in trainer.model.state_dict().items():
                if not torch.equal(tensor, model_state[name]):
                    return f"checkpoint round trip changed {name}", losses
            if trainer_state["step"] != 2:
                return "checkpoint round trip lost the step", losses
            return "", losses
    except DataError:
        raise  # bad input, not a failed check: the CLI reports it with exit 2
    except MemoryError:
        return "out of CPU memory", []
    except Exception as e:  # the point of a smoke test: report any failure as a reason, not a traceback
        at = traceback.extract_tb(e.__traceback__)[-1]
        return f"{type(e).__name__}: {e} (at {Path(at.filename).name}:{at.lineno})", []
    finally:
        if trainer is not None:
            trainer.close()


# --- data: the real splits against the real sequence length ------------------------------------------------


def check_data(dataset: data.Dataset, cfg: Config) -> None:
    """DataError naming the settings that would help when a split cannot hold one window of model.seq_len + 1
    tokens (the smoke steps use a shorter one; training does not)."""
    seq_len = cfg.model.seq_len
    try:
        dataset.check_fits(seq_len)
        return
    except DataError:
        pass
    d, need = cfg.data, seq_len + 1
    largest = {split: max((len(s) for s in shards), default=0) for split, shards in dataset.shards.items()}
    short = [f"the {split} split has {n:,}" for split, n in largest.items() if n < need]
    total = dataset.train_tokens + dataset.val_tokens
    fixes = []
    if d.shard_tokens < need:
        fixes.append(f"data.shard_tokens={need} or more (now {d.shard_tokens}: no shard holds a window)")
    else:
        vf = _val_fraction(total, need)
        if vf is not None and vf != d.val_fraction:
            fixes.append(f"data.val_fraction={vf:g} (now {d.val_fraction:g})")
    fits_now = min(largest.values()) - 1
    if fits_now >= 1:
        fixes.append(f"model.seq_len={fits_now} or less (the longest both splits hold now)")
    more = _tokens_needed(need, d.val_fraction)
    files = "more files in data.paths" if d.source == "text" else "data=text with your files in data.paths"
    fixes.append(
        f"more text: {files} (the corpus has {total:,} tokens; at data.val_fraction={d.val_fraction:g} both "
        f"splits hold a window from about {more:,})"
    )
    chars = dataset.meta.get("sources", {}).get("chars", 0)
    if d.max_chars > 0 and chars >= d.max_chars and total > 0:
        wanted = _round_up(more * chars / total * 1.1)
        fixes.append(f"data.max_chars={wanted} (now {d.max_chars}: the cap cut the corpus short)")
    raise DataError(
        f"corpus too small for model.seq_len={seq_len}: one window needs {need} tokens, but "
        f"{' and '.join(short)} in its largest shard — " + "; or ".join(fixes)
    )


def _val_fraction(total: int, need: int) -> float | None:
    """The data.val_fraction, rounded, that leaves both splits `need` tokens, or None if none can."""
    if total < 2 * need:
        return None
    for digits in (2, 3, 4, 5):
        scale = 10**digits
        for vf in (
            math.ceil(need / total * scale) / scale,
            math.floor((total - need) / total * scale) / scale,
        ):
            n_val = math.ceil(total * vf)  # as greenrun.data.cache splits the stream
            if 0 < vf < 1 and n_val >= need and total - n_val >= need:
                return vf
    return None


def _tokens_needed(need: int, val_fraction: float) -> int:
    """The corpus size, in tokens, whose split at val_fraction gives both splits `need` tokens."""
    total = max(2 * need, math.ceil(need / val_fraction), math.ceil(need / (1 - val_fraction)) + 1)
    while math.ceil(total * val_fraction) < need or total - math.ceil(total * val_fraction) < need:
        total += 1
    return total


def _round_up(x: float) -> int:
    """x rounded up to two significant digits: a number to type."""
    if x <= 0:
        return 0
    step = 10 ** max(0, int(math.log10(x)) - 1)
    return int(math.ceil(x / step) * step)


# --- the report ------------------------------------------------------------------------------------------------


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def print_result(result: SmokeResult, cfg: Config, reporter: Reporter) -> None:
    c = reporter.console
    status = "[bold green]PASS[/bold green]" if result.passed else "[bold red]FAIL[/bold red]"
    c.print(f"smoke {status} in {result.seconds:.1f} s: model={cfg.model.name}, {result.params:,} parameters")
    name = cfg.precision.name
    if result.ran_as and result.ran_as != name:
        c.print(
            f"  {name} ran as {result.ran_as} on the CPU: {result.ran_as_why}; the memory prediction is {name}'s",
            markup=False,
        )
    if result.layers_run < cfg.model.n_layer:
        c.print(
            f"  depth-reduced to {result.layers_run} of {cfg.model.n_layer} blocks: the full fp32 training state "
            f"({result.params * BYTES_PER_PARAM_CPU / 2**30:.1f} GiB) would not fit in this machine's memory; "
            "every block has the same shape, so the check still covers them"
        )
    if result.losses:
        c.print(f"  losses: {', '.join(f'{x:.4f}' for x in result.losses)}")
    if result.steps_failed:
        c.print(f"  reason: {result.steps_failed}", markup=False)
    if result.estimate is not None:
        mb = cfg.trainer.micro_batch_size
        c.print(
            f"  predicted peak training memory per device (full config: micro-batch {mb} x {cfg.model.seq_len} "
            f"tokens, {cfg.precision.name}, checkpointing {cfg.activation_checkpointing.policy}):"
        )
        for name, value in result.estimate.table():
            c.print(f"    {name:<18} {value}")
        if result.target is not None:
            _print_fit(result, c)
    # Whether a preemption's checkpoint reaches the bucket in time, at the upload speed measured now.
    c.print(emergency.estimate_line(cfg.storage, cfg.spot, result.params, Path(cfg.run.dir)), markup=False)


def _print_fit(result: SmokeResult, c) -> None:
    where, total = result.target, result.estimate.total
    capacity = where.capacity()
    if total <= capacity and where.memory is not None:
        c.print(f"  fits: {fit.gib(total)} of {fit.gib(capacity)} on {where.name}", markup=False)
        return
    if total <= capacity:
        holding = [gpu.name for gpu in where.fits_on(total)]
        small = [
            f"{gpu.name} ({gpu.memory_gib:g} GiB)" for gpu in target.GPUS.values() if gpu.name not in holding
        ]
        on = (
            f"too large for {', '.join(small)}; fits {', '.join(holding)}"
            if small
            else "fits every GPU of the table"
        )
        c.print(f"  {fit.gib(total)} per GPU: {on} (no GPU here; smoke.target=NAME checks one)", markup=False)
        return
    c.print(
        f"  does not fit: {fit.gib(total)} needed, {fit.gib(capacity)} on {fit.where_name(where)}",
        style="yellow",
        markup=False,
    )
    if not result.levers:
        c.print("  no lever lowers it: a smaller model (model.*), or a target with more memory", markup=False)
        return
    c.print(f"  levers, with the peak each predicts (fits = within {fit.gib(capacity)}):", markup=False)
    width = max(len(lever.settings) for lever in result.levers)
    for lever in result.levers:
        verdict = "fits" if lever.total <= capacity else "still too large"
        c.print(f"    {lever.settings:<{width}}  {fit.gib(lever.total):>10}  {verdict}", markup=False)
