"""Whether a config fits a device, and if not, what would: the full config's predicted peak memory
(greenrun.train.memory) held against a target (greenrun.train.target), and every lever that exists — a smaller
micro-batch with more accumulation, each checkpointing policy, precision and optimizer of the registries — with
the peak it would predict. `greenrun smoke` reports it (print_fit); nothing here runs a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from greenrun.config import Config
from greenrun.core import shipped
from greenrun.train import activation_checkpointing, memory, optimizer, precision, target
from greenrun.train.target import GiB, Target

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Lever:
    settings: str  # the overrides, e.g. "activation_checkpointing=full"
    total: int  # bytes: the predicted peak per device with them


# --- memory: the full config's estimate and the levers that change it ----------------------------------------


def estimate(cfg: Config) -> memory.MemoryEstimate | None:
    mb = cfg.trainer.micro_batch_size
    if not isinstance(mb, int):
        return None  # micro_batch_size=auto: the probe sizes it on the real device
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


def memory_verdict(cfg: Config, where: Target) -> tuple[str, list[Lever]]:
    """("" or why the full config's predicted peak does not fit `where`, the levers when it does not)."""
    predicted = estimate(cfg)
    if predicted is None or predicted.total <= where.capacity():
        return "", []
    why = f"predicted peak {gib(predicted.total)} per device does not fit: {gib(where.capacity())} on {where_name(where)}"
    return why, find_levers(cfg, where)


def _switch(cfg: Config, group: str, name: str, key: str) -> tuple[str, Config]:
    """(override, config) for group `group` set to registered option `name`: its shipped YAML applied to the
    group's defaults when one exists (what `group=name` composes), else `group.key=name` alone."""
    current = getattr(cfg, group)
    if name in shipped.option_names(group):
        known = {f.name for f in dataclasses.fields(current)}
        values = {
            k: v
            for k, v in shipped.load_option(group, name).items()
            if k in known and not isinstance(v, dict)
        }
        return f"{group}={name}", dataclasses.replace(
            cfg, **{group: dataclasses.replace(type(current)(), **values)}
        )
    return f"{group}.{key}={name}", dataclasses.replace(
        cfg, **{group: dataclasses.replace(current, **{key: name})}
    )


def _micro_batch(cfg: Config, capacity: int) -> tuple[str, Config] | None:
    """The largest smaller micro-batch that fits (or the smallest there is), with grad_accum_steps raised so
    that micro x accum, the batch per optimizer step, stays the same."""
    t = cfg.trainer
    per_step = t.micro_batch_size * t.grad_accum_steps
    found = None
    for mb in range(t.micro_batch_size - 1, 0, -1):
        if per_step % mb:
            continue
        smaller = dataclasses.replace(
            cfg, trainer=dataclasses.replace(t, micro_batch_size=mb, grad_accum_steps=per_step // mb)
        )
        found = (f"trainer.micro_batch_size={mb} trainer.grad_accum_steps={per_step // mb}", smaller)
        if estimate(smaller).total <= capacity:
            break
    return found


def find_levers(cfg: Config, where: Target) -> list[Lever]:
    """Each setting that exists and lowers the predicted peak, alone, with the peak it predicts (options of one
    kind that predict the same peak share a line); then, when none fits alone, the lowest of each kind together.

    The options are the registries' (POLICIES, PRECISIONS, OPTIMIZERS), so only settings that exist are named;
    precisions and optimizers this machine's target device cannot run (fp8 or adamw8bit on a CPU) are left out.
    """
    capacity, base = where.capacity(), estimate(cfg).total
    levers: list[Lever] = []
    best: list[tuple[str, str, Config]] = []  # (group, override, config): the lowest of each kind
    micro = _micro_batch(cfg, capacity)
    if micro is not None:
        levers.append(Lever(micro[0], estimate(micro[1]).total))
    precisions = [name for name in precision.PRECISIONS if _runs_on(precision.get(name), where)]
    optimizers = [name for name in optimizer.OPTIMIZERS if _runs_on(optimizer.get(name), where)]
    kinds = (
        ("activation_checkpointing", "policy", list(activation_checkpointing.POLICIES)),
        ("precision", "name", precisions),
        ("optimizer", "name", optimizers),
    )
    for group, key, names in kinds:
        current = getattr(getattr(cfg, group), key)
        by_total: dict[int, list[tuple[str, Config]]] = {}
        for name in names:
            if name != current:
                override, switched = _switch(cfg, group, name, key)
                by_total.setdefault(estimate(switched).total, []).append((override, switched))
        lower = sorted(total for total in by_total if total < base)
        levers += [Lever(" or ".join(o for o, _ in by_total[total]), total) for total in lower]
        if lower:
            best.append((group, *by_total[lower[0]][0]))
    if best and not any(lever.total <= capacity for lever in levers):
        combined, settings = cfg, []
        for group, override, switched in best:
            combined = dataclasses.replace(combined, **{group: getattr(switched, group)})
            settings.append(override)
        micro = _micro_batch(combined, capacity)
        if micro is not None:
            combined, settings = micro[1], [*settings, micro[0]]
        if len(settings) > 1:
            levers.append(Lever(" ".join(settings), estimate(combined).total))
    return levers


def _runs_on(option: precision.Precision | optimizer.OptimizerOption, where: Target) -> bool:
    """Whether a precision or optimizer option can run on the target, as far as this machine can tell (a table
    GPU or a bare size cannot be asked)."""
    return where.device is None or not option.device_problems(where.device)


def gib(nbytes: int) -> str:
    x = nbytes / GiB
    return f"{x:.1f} GiB" if x >= 10 else f"{x:.2f} GiB" if x >= 1 else f"{x:.3g} GiB"


def where_name(where: Target) -> str:
    return where.name if where.memory is not None else f"the largest GPU of the table, {_largest().label}"


def _largest() -> target.Gpu:
    return max(target.GPUS.values(), key=lambda gpu: gpu.memory)


# --- the report -------------------------------------------------------------------------------------------


def print_fit(c: Console, where: Target, total: int, levers: list[Lever]) -> None:
    """The smoke report's verdict on `total` bytes per device against `where`, with the levers when it does
    not fit."""
    capacity = where.capacity()
    if total <= capacity and where.memory is not None:
        c.print(f"  fits: {gib(total)} of {gib(capacity)} on {where.name}", markup=False)
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
        c.print(f"  {gib(total)} per GPU: {on} (no GPU here; smoke.target=NAME checks one)", markup=False)
        return
    c.print(
        f"  does not fit: {gib(total)} needed, {gib(capacity)} on {where_name(where)}",
        style="yellow",
        markup=False,
    )
    if not levers:
        c.print("  no lever lowers it: a smaller model (model.*), or a target with more memory", markup=False)
        return
    c.print(f"  levers, with the peak each predicts (fits = within {gib(capacity)}):", markup=False)
    width = max(len(lever.settings) for lever in levers)
    for lever in levers:
        verdict = "fits" if lever.total <= capacity else "still too large"
        c.print(f"    {lever.settings:<{width}}  {gib(lever.total):>10}  {verdict}", markup=False)
