"""A run's global batch across world sizes: a checkpoint written by N processes continues on M with the same
micro-batch x accumulation x world (accumulation recomputed) where the arithmetic allows, else a refusal that
shows the arithmetic and the overrides that would fit.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.config import Config, ConfigError

log = logging.getLogger("greenrun.job")


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _with_split(cfg: Config, micro: int, accum: int) -> Config:
    trainer = dataclasses.replace(cfg.trainer, micro_batch_size=micro, grad_accum_steps=accum)
    return dataclasses.replace(cfg, trainer=trainer)


def _written_split(saved: Config, manifest: dict[str, Any], world: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, processes) a checkpoint was trained with. One written before resumes could
    change the world size names the world only: its split is the saved config's, which nothing changed then."""
    t = saved.trainer
    keys = {
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "world_size": world,
    }
    values = {key: manifest.get(key, default) for key, default in keys.items()}
    bad = [f"{k}={v!r}" for k, v in values.items() if type(v) is not int or v < 1]  # a manifest is data
    if bad:
        raise CheckpointError(f"manifest.json holds {', '.join(bad)}: not a positive whole number")
    return values["micro_batch_size"], values["grad_accum_steps"], values["world_size"]


def keep_global_batch(
    saved: Config, cfg: Config, manifest: dict[str, Any], world: int, where: str
) -> tuple[Config, Config | None]:
    """(cfg to resume with on `world` processes, the same cfg with the checkpoint's own split, which its config
    hash covers), the second None where this resume changes the global batch.

    The split is this resume's if its overrides change micro-batch or accumulation, else the checkpoint's
    micro-batch with accum x N / M accumulation steps (N processes wrote it, M resume it). Slots number a
    step's micro-batches alike on any world size (dataset.global_slot), so with the micro-batch kept the
    resumed steps draw the sequences the run on N would have. trainer.micro_batch_size=auto (train ...
    resume=auto) keeps the saved, probed split: a new probe would change the batches. Where accum x N / M is
    not whole the resume is refused (ConfigError) with the splits that fit, unless allow_config_change.
    """
    if cfg.trainer.micro_batch_size == "auto" and isinstance(saved.trainer.micro_batch_size, int):
        cfg = _with_split(cfg, saved.trainer.micro_batch_size, saved.trainer.grad_accum_steps)
    if not manifest:  # no checkpoint: nothing to keep
        return cfg, cfg
    micro, accum, written = _written_split(saved, manifest, world)
    as_written, size = _with_split(cfg, micro, accum), micro * accum * written
    t, s = cfg.trainer, saved.trainer
    if (t.micro_batch_size, t.grad_accum_steps) != (s.micro_batch_size, s.grad_accum_steps):  # overridden
        if not isinstance(t.micro_batch_size, int) or t.micro_batch_size * t.grad_accum_steps * world != size:
            return cfg, None  # a new global batch: the maths check names it
        if t.micro_batch_size != micro or written != world:
            other = (
                ", other sequences (another micro-batch draws its own)" if t.micro_batch_size != micro else ""
            )
            log.info(
                f"{where}: written by {_processes(written)} with micro-batch {micro} x accumulation {accum}, "
                f"resuming on {_processes(world)} with {t.micro_batch_size} x {t.grad_accum_steps}: the same "
                f"{size}-sequence global batch{other}"
            )
        return cfg, as_written
    if accum * written % world == 0:
        if written != world:
            log.info(
                f"{where}: written by {_processes(written)} with accumulation {accum}, resuming on "
                f"{_processes(world)} with accumulation {accum * written // world}: the same {size}-sequence "
                f"global batch (micro-batch {micro})"
            )
            if cfg.model.dropout > 0:
                log.warning(
                    f"model.dropout={cfg.model.dropout}: its masks come from the global RNG, restored from rank 0, "
                    "so the resumed steps are not the ones the run would have taken on its old world size"
                )
        return _with_split(cfg, micro, accum * written // world), as_written
    if cfg.allow_config_change:
        log.warning(
            f"{where}: allow_config_change=true: the global batch goes from {size} to "
            f"{micro * accum * world} sequences ({micro} x {accum} x {world})"
        )
        return cfg, None
    raise ConfigError([_split_refusal(where, micro, accum, written, world)])


def _split_refusal(where: str, micro: int, accum: int, written: int, world: int) -> str:
    """Why the global batch of a checkpoint does not cut into `world` processes, and what would fit."""
    size, rounds = micro * accum * written, accum * written
    worlds = sorted(k for k in range(1, rounds + 1) if rounds % k == 0)
    near = sorted(sorted(worlds, key=lambda k: (abs(k - world), k))[:4])
    fits = [
        f"resume on {' or '.join(map(str, near))} process{'es' if near != [1] else ''} (the same micro-batch "
        "and sequences)"
    ]
    if size % world == 0:
        per = size // world  # sequences per process per step
        m = max(d for d in range(1, min(micro, per) + 1) if per % d == 0)
        fits.append(
            f"trainer.micro_batch_size={m} trainer.grad_accum_steps={per // m} on {_processes(world)} (the "
            "same global batch, other sequences: another micro-batch draws its own)"
        )
    else:
        fits.append(f"no micro-batch x accumulation on {_processes(world)} makes {size} sequences")
    return (
        f"{where}: written by {_processes(written)} with micro-batch {micro} x accumulation {accum}, a global "
        f"batch of {size} sequences; on {_processes(world)} the same micro-batch needs {accum} x {written} / "
        f"{world} = {rounds / world:.4g} accumulation steps, not a whole number. To keep the global batch: "
        + "; or ".join(fits)
        + f". Or add allow_config_change=true to continue with {micro * accum * world} sequences per step"
    )
