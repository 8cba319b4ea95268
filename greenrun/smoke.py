"""`greenrun smoke`: the real configuration for two optimizer steps, in seconds, before training.

It builds the real data splits and checks them against the real sequence length, runs the configured
architecture (widths, heads, vocabulary) forward, backward and through an optimizer step, and round-trips a
checkpoint; micro-batch and sequence length shrink, and so may the depth and the precision (the report says
which, and why):

- A run that trains on a GPU runs its two steps on this machine's GPU when one is free, in the configured
  precision, eager; otherwise on the CPU in fp32: CPU autocast tests none of the GPU's kernels, and emulated
  half-precision backward on a CPU costs minutes where fp32 takes seconds.
- Such a run, and a model whose fp32 training state would not fit in this machine's memory, runs fewer blocks
  of the same width: every block has the same shapes, so two of them (more when the checkpointing plan needs
  them to show each of its modes) catch what all of them would, block-to-block wiring included, at a fraction
  of the model init, step and checkpoint time.

Then it predicts the FULL config's peak memory per device (greenrun.train.memory), in the configured
precision, and holds it against the target device (`smoke.target`, greenrun.train.target): a prediction that
does not fit FAILs, and the report gives each lever that exists (micro-batch, checkpointing policy, precision,
optimizer) with the peak it would predict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from greenrun import data, fit, plan
from greenrun.ckpt import checkpoint, emergency
from greenrun.config import Config
from greenrun.core.output import Reporter
from greenrun.data import DataError
from greenrun.runtime import distributed
from greenrun.train import activation_checkpointing, memory, model, optimizer, precision, target
from greenrun.train.early_stopping import NonFiniteError
from greenrun.train.target import GiB, Target

SMOKE_MICRO_BATCH = 2  # sequences per micro-batch
SMOKE_SEQ_LEN = 64  # tokens per sequence
SMOKE_BLOCKS = 2  # blocks a depth-reduced run keeps: two, so one block's output feeds another's input
BYTES_PER_PARAM_CPU = 16  # fp32 weights + grads + two AdamW moments
RAM_SHARE = 0.5  # share of available memory the smoke run may take
FP32 = "fp32"  # what the CPU steps of a GPU config run in
GPU_MARGIN = 1.25  # the small run's predicted peak times this, plus GPU_HEADROOM, must be free on the GPU
GPU_HEADROOM = GiB  # cuBLAS workspaces and allocator slack the estimate does not count


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
    ran_as: str = ""  # the precision the two steps ran in
    ran_as_why: str = ""  # why that one, when it is not the configured precision
    steps_failed: str = ""  # why the two steps failed ("" when they passed; memory aside)
    ran_on: str = "the CPU"  # where the two steps ran, in words
    ran_on_why: str = ""  # why there
    layers_why: str = ""  # why fewer blocks than configured ran


def available_ram() -> int:
    return target.ram()


def cpu_precision(cfg: Config, on_gpu: bool) -> tuple[str, str]:
    """(precision, why) for two steps on the CPU: fp32 for a run that trains on a GPU, else the configured
    precision's CPU stand-in (itself, or bf16 for fp8)."""
    name = cfg.precision.name
    stand_in = precision.get(name).cpu_stand_in
    if on_gpu and stand_in != FP32:
        # Not measured: a CPU whose bf16 matmuls are fast may still emulate parts of autocast backward.
        return FP32, (
            f"CPU autocast tests none of a GPU's kernels, and emulated {stand_in} backward can take minutes "
            "where fp32 takes seconds"
        )
    return stand_in, "" if stand_in == name else "its own kernels need a GPU"


def smoke_depth(cfg: Config, on_gpu: bool, ram: int) -> tuple[int, str]:
    """(blocks to run, why fewer than configured, or ""): all of them for a CPU run that fits in `ram`, else
    the fewest blocks, at least SMOKE_BLOCKS, whose checkpointing plan holds every mode the full plan does
    (sqrt recomputes nothing in 2 blocks), and no more than fit in RAM_SHARE of `ram` in fp32."""
    full = cfg.model.n_layer
    params = model.count_params(cfg.model, non_embedding=False)
    state = params * BYTES_PER_PARAM_CPU
    too_big = state > RAM_SHARE * ram
    if not on_gpu and not too_big:
        return full, ""
    n = _fewest_blocks(cfg)
    if too_big:
        per_block = max(1, model.count_params(dataclasses.replace(cfg.model, n_layer=1), non_embedding=True))
        room = RAM_SHARE * ram / BYTES_PER_PARAM_CPU - (params - per_block * full)
        n = int(max(1, min(n, room // per_block)))
    if n >= full:
        return full, ""
    if too_big:
        return (
            n,
            f"as the full fp32 training state ({state / GiB:.1f} GiB) would not fit in this machine's RAM",
        )
    return n, "to keep the preflight of a GPU run short"


def _fewest_blocks(cfg: Config) -> int:
    full = cfg.model.n_layer
    policy = cfg.activation_checkpointing
    modes = set(activation_checkpointing.plan(policy, full))
    for n in range(min(SMOKE_BLOCKS, full), full):
        if set(activation_checkpointing.plan(policy, n)) == modes:
            return n
    return full


def preflight_device(
    on_gpu: bool, cuda: bool, free: int | None, need: int, problems: list[str] | None = None
) -> tuple[bool, str]:
    """(whether the two steps run on this machine's GPU, why): only for a run that trains on a GPU, on a
    visible one with `need` bytes `free` (None: it could not be asked) that can run the configured precision
    (`problems`: what stops it there)."""
    if not on_gpu:
        return False, ""
    if not cuda:
        return False, "the run trains on a GPU, and none is visible here"
    if problems:
        return False, problems[0]
    if free is None or free < need:
        have = "an unknown amount" if free is None else fit.gib(free)
        return (
            False,
            f"the run trains on a GPU, but the one here has {have} free of the {fit.gib(need)} needed",
        )
    return True, f"{fit.gib(free)} free there, {fit.gib(need)} needed"


def _gpu(cfg: Config, on_gpu: bool, n_layer: int) -> tuple[torch.device | None, str]:
    """(this machine's GPU for the two steps, or None; why): asks CUDA only for a run that trains on a GPU."""
    if not on_gpu or not torch.cuda.is_available():
        return None, preflight_device(on_gpu, False, None, 0)[1]
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # each torchrun rank its own
    small = smoke_config(cfg, n_layer, cfg.precision.name, device="cuda")
    need = int(fit.estimate(small).total * GPU_MARGIN) + GPU_HEADROOM
    try:
        free = torch.cuda.mem_get_info(device)[0]
    except RuntimeError:  # busy in exclusive-process mode, or a broken driver: not free
        free = None
    problems = precision.get(cfg.precision.name).device_problems(device)
    use, why = preflight_device(on_gpu, True, free, need, problems)
    return (device if use else None), why


def smoke_config(cfg: Config, n_layer: int, run_as: str | None = None, device: str = "cpu") -> Config:
    """The same config shrunk to two steps on `device`: same widths, heads and vocabulary; `n_layer` blocks;
    precision `run_as` (default: the configured precision's CPU stand-in); eager."""
    t = cfg.trainer
    return dataclasses.replace(
        cfg,
        precision=dataclasses.replace(
            cfg.precision, name=run_as or precision.get(cfg.precision.name).cpu_stand_in
        ),
        model=dataclasses.replace(cfg.model, n_layer=n_layer, seq_len=min(cfg.model.seq_len, SMOKE_SEQ_LEN)),
        trainer=dataclasses.replace(
            t,
            device=device,
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
        # An optimizer that needs a GPU (adamw8bit) steps as its CPU stand-in there; the estimate stays its own.
        optimizer=dataclasses.replace(cfg.optimizer, name=_optimizer_on(cfg.optimizer.name, device)),
        # Scoring the corpus under a reference model takes minutes; two steps only need windows in bins.
        curriculum=dataclasses.replace(cfg.curriculum, score="length")
        if cfg.curriculum.score == "model"
        else cfg.curriculum,
        checkpoint=dataclasses.replace(cfg.checkpoint, interval=0, keep_last=1),
        energy=dataclasses.replace(cfg.energy, sensor="none"),  # two steps: nothing worth metering
    )


def _optimizer_on(name: str, device: str) -> str:
    if device != "cpu" or name not in optimizer.OPTIMIZERS:
        return name
    return optimizer.get(name).cpu_stand_in or name


def run(cfg: Config) -> SmokeResult:
    t0 = time.perf_counter()
    params = model.count_params(cfg.model, non_embedding=False)
    where = target.resolve(cfg.smoke, cfg.trainer.device)
    estimate = fit.estimate(cfg)  # the full config, configured precision: whatever the two steps run as
    too_big, levers = fit.memory_verdict(cfg, where)
    n_layer, layers_why = smoke_depth(cfg, where.gpu, available_ram())
    gpu, ran_on_why = _gpu(cfg, where.gpu, n_layer)
    if gpu is not None:
        run_as, why = cfg.precision.name, ""
        small = smoke_config(cfg, n_layer, run_as, device="cuda")
        ran_on = f"{torch.cuda.get_device_name(gpu)} ({gpu})"
    else:
        run_as, why = cpu_precision(cfg, where.gpu)
        small, ran_on = smoke_config(cfg, n_layer, run_as), "the CPU"
    failed, losses = _two_steps(cfg, small, gpu or torch.device("cpu"))
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
        ran_on=ran_on,
        ran_on_why=ran_on_why,
        layers_why=layers_why,
    )


def _two_steps(cfg: Config, small: Config, device: torch.device) -> tuple[str, list[float]]:
    """(why the two steps failed or "", their losses): the real data, the small model, a checkpoint."""
    from greenrun.trainer import Trainer  # trainer pulls in the whole stack; keep `import smoke` light

    trainer = None
    try:
        dataset = data.build(cfg.data, cfg.model.vocab_size)
        check_data(dataset, cfg)  # the real seq_len, not the shrunk one: training reads the same splits
        with tempfile.TemporaryDirectory(prefix="greenrun-smoke-") as tmp:
            one = distributed.Dist(rank=0, world_size=1, local_rank=0, device=device)
            trainer = Trainer(small, Path(tmp), reporter=Reporter(enabled=False), dist=one, data_set=dataset)
            losses = [trainer.train_step()["loss"] for _ in range(2)]
            if not all(map(_finite, losses)):
                return f"loss is not finite: {losses}", losses
            written = checkpoint.write(trainer.snapshot(), Path(tmp) / "checkpoints")
            model_state, _, trainer_state, _ = checkpoint.load(written)
            for name, tensor in trainer.model.state_dict().items():
                if not torch.equal(tensor.cpu(), model_state[name]):
                    return f"checkpoint round trip changed {name}", losses
            if trainer_state["step"] != 2:
                return "checkpoint round trip lost the step", losses
            return "", losses
    except DataError:
        raise  # bad input, not a failed check: the CLI reports it with exit 2
    except NonFiniteError as e:
        return f"loss is not finite: {e}", []
    except MemoryError:
        return "out of CPU memory", []
    except torch.cuda.OutOfMemoryError:
        return f"out of memory on {device}", []
    except Exception as e:  # the point of a smoke test: report any failure as a reason, not a traceback
        at = traceback.extract_tb(e.__traceback__)[-1]
        return f"{type(e).__name__}: {e} (at {Path(at.filename).name}:{at.lineno})", []
    finally:
        if trainer is not None:
            trainer.close()
        if device.type == "cuda":
            del trainer
            torch.cuda.empty_cache()  # training's auto micro-batch probe must find the GPU as empty as it was


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
    c.print(f"  {_ran(result, cfg)}", markup=False)
    n, full = result.layers_run, cfg.model.n_layer
    if n < full:
        c.print(
            f"  ran {n} of {full} blocks (same width, heads and vocabulary) {result.layers_why}: every block "
            f"has the same shapes, so {n} catch the shape mistakes all {full} would; the memory prediction is "
            f"all {full}'s",
            markup=False,
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
            # This row is the optimizer's alone (AdamW keeps 8 bytes a parameter, Adafactor a fraction of one).
            which = f"  (optimizer={cfg.optimizer.name})" if name == "optimizer_state" else ""
            c.print(f"    {name:<18} {value}{which}", markup=False)
        if result.target is not None:
            fit.print_fit(c, result.target, result.estimate.total, result.levers)
    # Whether a preemption's checkpoint reaches the bucket in time, at the upload speed measured now.
    c.print(emergency.estimate_line(cfg.storage, cfg.spot, result.params, Path(cfg.run.dir)), markup=False)
    # The full run's FLOPs, GPU-hours, kWh, kg CO2e and $ on the target GPU (greenrun.plan): arithmetic only.
    for line in plan.projection_lines(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1"))):
        c.print(line, markup=False)


def _ran(result: SmokeResult, cfg: Config) -> str:
    """One sentence: where the two steps ran, in what precision, and why."""
    name, where = cfg.precision.name, result.ran_on
    if where != "the CPU":
        return f"ran on {where} in {name}, eager: {result.ran_on_why}"
    if result.ran_on_why:
        where = f"the CPU ({result.ran_on_why})"
    if result.ran_as and result.ran_as != name:
        return f"{name} ran as {result.ran_as} on {where}: {result.ran_as_why}; the memory prediction is {name}'s"
    return f"ran on {where} in {name}, as configured"
