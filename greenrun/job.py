"""One run's life, from a typed Config to a typed result: smoke, train, resume and archive.

The CLI turns argv into a Config and calls one function here; everything a run does between those two points
lives in this module, in order: preflight, distributed setup, the auto micro-batch, the data, the saved config,
the bucket mirror, the Trainer, the outcome. Known failures become a JobResult, never a traceback:

    result = job.guarded(lambda: job.train(cfg))
    sys.exit(result.exit_code)
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from greenrun import config, data, elastic, runs, smoke, storage
from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointError
from greenrun.ckpt.uploader import describe as describe_remote
from greenrun.config import Config, ConfigError
from greenrun.core.fs import atomic_write
from greenrun.core.output import Reporter
from greenrun.data import DataError
from greenrun.runtime import distributed, hardware
from greenrun.runtime.spot import EXIT_ABORTED, EXIT_LOCAL_ONLY, EXIT_PREEMPTED, PreemptionAbort
from greenrun.train import autobatch, precision, schedule
from greenrun.train.early_stopping import NonFiniteError
from greenrun.trainer import Trainer

log = logging.getLogger(__name__)

CPU_TOKENS_PER_STEP = 65_536  # above this, one optimizer step on a CPU takes long enough to warn about


class Outcome(enum.IntEnum):
    """How a job ended; the value is the process exit code."""

    OK = 0  # finished, stopped at trainer.stop_at_step, or a smoke test that passed
    FAILED = 1  # a runtime failure (a failed preflight or smoke test, a broken checkpoint, a crash)
    USAGE = 2  # bad configuration or usage: nothing was started
    # 75: the emergency checkpoint is committed in the bucket (run.dir with storage=local): resume anywhere
    PREEMPTED = EXIT_PREEMPTED
    ABORTED = EXIT_ABORTED  # 76: the deadline passed or a second signal came; resume from the previous one
    # 77: the newest checkpoint is committed on this machine's disk only (its upload failed or missed the
    # deadline); the message names the newest one safe in the bucket. After a preemption or a normal end.
    LOCAL_ONLY = EXIT_LOCAL_ONLY
    INTERRUPTED = 130  # Ctrl-C before training started


@dataclass
class JobResult:
    outcome: Outcome
    message: str = ""  # what went wrong, for the user (empty on success)
    run_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # train: what summary.json holds

    @property
    def exit_code(self) -> int:
        return int(self.outcome)


def guarded(fn: Callable[[], JobResult]) -> JobResult:
    """Known failures become one message and an outcome; a traceback only with GREENRUN_DEBUG=1."""
    try:
        return fn()
    except (ConfigError, DataError) as e:
        return JobResult(Outcome.USAGE, str(e))
    except CheckpointError as e:
        return JobResult(Outcome.FAILED, f"checkpoint: {e}")
    except storage.StorageError as e:  # the message names the endpoint and key, never a credential
        return JobResult(Outcome.FAILED, f"storage: {e}")
    except NonFiniteError as e:  # the message names the step, the values and the settings to change
        return JobResult(Outcome.FAILED, str(e))
    except PreemptionAbort as e:
        return JobResult(Outcome.ABORTED, f"aborted: {e}")
    except KeyboardInterrupt:
        return JobResult(Outcome.INTERRUPTED, "interrupted")
    except Exception as e:
        if os.environ.get("GREENRUN_DEBUG"):
            raise
        return JobResult(
            Outcome.FAILED, f"failed: {type(e).__name__}: {e}\n(set GREENRUN_DEBUG=1 to see the traceback)"
        )


# --- smoke ---------------------------------------------------------------------------------------------


def run_smoke(cfg: Config, reporter: Reporter | None = None) -> JobResult:
    result = smoke.run(cfg)
    smoke.print_result(result, cfg, reporter or Reporter())
    if result.passed:
        return JobResult(Outcome.OK)
    return JobResult(Outcome.FAILED, f"smoke test failed: {result.reason}")


# --- train ---------------------------------------------------------------------------------------------


def resolve_micro_batch(cfg: Config, dist: distributed.Dist) -> Config:
    """A copy of cfg with trainer.micro_batch_size=auto replaced by probed numbers (cfg itself is unchanged).

    Runs before the real model exists, so the probe finds the device as empty as training will; the numbers
    go into config.yaml, so a resume reuses them instead of probing again (another split would change batches).
    """
    if cfg.trainer.micro_batch_size != "auto":
        return cfg
    choice = autobatch.resolve(cfg, dist.device, dist.world_size, log.info)
    if dist.device.type == "cpu" and choice.tokens_per_step > CPU_TOKENS_PER_STEP:
        log.warning(
            f"trainer.global_batch_tokens={cfg.trainer.global_batch_tokens} on a CPU: each optimizer step trains "
            f"{choice.tokens_per_step:,} tokens ({choice.micro_batch} x {choice.grad_accum_steps} accumulation), "
            "minutes per step here; a GPU-sized batch wants a GPU"
        )
    trainer = dataclasses.replace(
        cfg.trainer, micro_batch_size=choice.micro_batch, grad_accum_steps=choice.grad_accum_steps
    )
    return dataclasses.replace(cfg, trainer=trainer)


def _warn_if_slow_here(cfg: Config, dist: distributed.Dist) -> None:
    """Half precision on a CPU is emulated and several times slower than fp32: say so once, with numbers."""
    option = precision.get(cfg.precision.name)
    if dist.device.type != "cpu" or option.autocast_dtype is None:
        return
    fp32, half = hardware.matmul_rates(option.autocast_dtype)
    if fp32 > 2 * half:
        log.warning(
            f"precision={cfg.precision.name} runs {fp32 / half:.1f}x slower than fp32 on this CPU "
            f"({half:.0f} vs {fp32:.0f} GFLOP/s measured now): use precision=fp32 here, {cfg.precision.name} on a GPU"
        )


def _dataset(cfg: Config, resume_from: Path | None) -> data.Dataset:
    """The token cache a checkpoint was trained on (resume), else the one cfg.data builds."""
    if resume_from is not None:
        key = checkpoint.read_manifest(resume_from).get("data_cache_key", "")
        cache = Path(cfg.data.cache_dir).expanduser() / key[:16] if key else None
        if cache is not None and (cache / "meta.json").is_file():
            return data.Dataset(cache)
    return data.build(cfg.data, cfg.model.vocab_size, seq_len=cfg.model.seq_len)


def train(cfg: Config, *, resume_from: Path | None = None) -> JobResult:
    """Preflight, then train cfg in cfg.run.dir (continuing the checkpoint `resume_from` when given)."""
    run_dir = Path(cfg.run.dir)
    if not runs.locked_here(run_dir):
        if problems := runs.run_dir_problems(run_dir):
            raise ConfigError(problems)
        # One writer per run directory: lock it (a second writer is refused, exit 2), then train inside the lock.
        with runs.hold(run_dir):
            return train(cfg, resume_from=resume_from)
    is_main = int(os.environ.get("RANK", "0")) == 0
    reporter = Reporter(enabled=is_main)
    if cfg.storage.kind != "local" and (problems := storage.access_problems(cfg.storage, run_dir)):
        raise ConfigError(problems)  # one cheap call, before the preflight (5-25 s on 2 cores)
    if cfg.preflight and resume_from is None:
        result = smoke.run(cfg)
        smoke.print_result(result, cfg, reporter)
        if not result.passed:
            return JobResult(
                Outcome.FAILED, "preflight failed; fix the config (or skip the check with preflight=false)"
            )
    dist = distributed.setup(cfg.trainer.device)
    try:
        if dist.is_main:
            _warn_if_slow_here(cfg, dist)
        cfg = resolve_micro_batch(cfg, dist)
        run_dir.mkdir(parents=True, exist_ok=True)
        dataset = _dataset(cfg, resume_from)
        remote, uploader = None, None
        if dist.is_main:
            atomic_write(run_dir / "config.yaml", config.to_yaml(cfg))
            remote = runs.open_remote(cfg, run_dir)
            uploader = runs.start_mirror(remote, run_dir, dataset.cache_path, cfg)
        trainer = Trainer(cfg, run_dir, dist=dist, data_set=dataset, uploader=uploader, reporter=reporter)
    except BaseException:
        distributed.teardown()
        raise
    failed = (
        False  # a rank that fails leaves at once; the others' next collective errors, as torchrun expects
    )
    try:
        if resume_from is not None:
            trainer.resume_from(resume_from)
            log.info(f"resumed from {resume_from} at step {trainer.step}")
        result = trainer.train()
        safe, said = describe_remote(result["remote"])  # where the checkpoints got, in one line
        if result["preempted"]:
            return _preempted(result, run_dir, dist.is_main, said)
        sample = trainer.sample() if result["finished"] else ""
        summary = {**result, "sample": sample}
        if dist.is_main:
            atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
        trainer.final_export()  # every rank: under fsdp the weights are gathered, rank 0 writes
        if result["early_stop"]:
            log.info(f"stopped early at step {result['step']}: {result['early_stop']['reason']}")
        if result["window_exit"]:  # a scheduler restarts it later, as after a preemption (exit 75)
            log.info(
                f"{result['window_exit']}: checkpointed at step {result['step']}; later: greenrun resume {run_dir}"
            )
            return JobResult(Outcome.PREEMPTED, run_dir=run_dir, summary=summary)
        if result["finished"]:
            reporter.summary(result, str(run_dir), sample)
        else:
            log.info(f"stopped at step {result['step']}; continue with: greenrun resume {run_dir}")
        if not safe:  # loud, and an exit code a scheduler can act on: this disk may be all there is
            return JobResult(Outcome.LOCAL_ONLY, said, run_dir=run_dir, summary=summary)
        if said:
            log.info(said)
        return JobResult(Outcome.OK, run_dir=run_dir, summary=summary)
    except BaseException:
        failed = True
        raise
    finally:
        trainer.close(together=not failed)
        # After a preemption the deadline leaves no time for housekeeping; the next start prunes.
        if remote is not None and not trainer.checkpointer.preempted:
            try:
                remote.prune(cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
            except storage.StorageError as e:  # housekeeping: the run's outcome stands, the next start prunes
                log.warning(f"pruning old checkpoints in the bucket failed, left for the next start: {e}")


def _preempted(result: dict[str, Any], run_dir: Path, is_main: bool, said: str) -> JobResult:
    """75 when the emergency checkpoint is safe in the run's storage, 77 when only this disk has it, 76
    when nothing was committed in time; summary.json says the same (written in milliseconds)."""
    summary = {**result, "sample": ""}
    if is_main:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    step, where, remote = result["step"], result["emergency"], result["remote"]
    if where in ("", "bucket") or (where == "local" and remote is None):
        log.info(f"preempted at step {step}; continue with: greenrun resume {run_dir}")
        return JobResult(Outcome.PREEMPTED, run_dir=run_dir, summary=summary)
    newest = remote["newest_committed_step"] if remote else None
    elsewhere = (
        f"elsewhere, resuming from the bucket continues from step {newest}"
        if newest is not None
        else "no checkpoint of this run is in the bucket"
    )
    if where == "local":
        message = (
            f"preempted at step {step}: the emergency checkpoint is committed on this machine's disk only. "
            f"{said}. On this machine: greenrun resume {run_dir}; {elsewhere}"
        )
        return JobResult(Outcome.LOCAL_ONLY, message, run_dir=run_dir, summary=summary)
    message = (
        f"preempted at step {step}: no emergency checkpoint was committed before the deadline; {elsewhere}"
    )
    return JobResult(Outcome.ABORTED, message, run_dir=run_dir, summary=summary)


def train_or_continue(cfg: Config) -> JobResult:
    """`train … resume=auto`: continue run.dir if it holds a run (a scheduler re-running the command)."""
    run_dir = Path(cfg.run.dir)
    if cfg.resume == "auto" and (run_dir / "config.yaml").is_file():
        with runs.hold(run_dir):  # before reading: the run's one writer decides what to continue
            return continue_run(config.load_yaml(run_dir / "config.yaml"), cfg, run_dir, missing_ok=True)
    return train(cfg)


# --- resume --------------------------------------------------------------------------------------------


def resume(target: str, overrides: list[str]) -> JobResult:
    """Continue RUN_DIR or s3://bucket/prefix/run from its newest valid checkpoint, with its saved config."""
    problems = config.check_overrides(overrides)
    if problems:
        raise ConfigError(problems)
    found = None
    if target.startswith("s3://"):
        found = runs.find(target, overrides)  # the bucket's config.yaml as plain data; nothing written yet
        run_dir, overrides = found.local_dir, found.overrides
    else:
        run_dir = Path(target)
        runs.saved_config_path(run_dir)  # a usage error unless train made it
    with runs.hold(run_dir):  # one writer: a second resume or train of this directory is refused (exit 2)
        saved = runs.restore(found) if found is not None else config.load_yaml(run_dir / "config.yaml")
        # stop_at_step ended the last slice; a resume runs on unless the command line sets a new stop.
        saved = dataclasses.replace(saved, trainer=dataclasses.replace(saved.trainer, stop_at_step=None))
        cfg = config.apply_overrides(saved, overrides)
        return continue_run(saved, cfg, run_dir, missing_ok=False)


# How the global batch (micro x accum x world sequences per step) is cut: kept, a new cut is no maths change.
_SPLIT_KEYS = ("trainer.micro_batch_size", "trainer.grad_accum_steps")


def continue_run(saved: Config, cfg: Config, run_dir: Path, missing_ok: bool) -> JobResult:
    """Resume run_dir with cfg, refusing math changes from `saved` unless allowed; start fresh if allowed."""
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
    path = checkpoint.latest_valid(run_dir / "checkpoints", warn=log.warning)
    manifest = checkpoint.read_manifest(path) if path is not None else {}
    # With the checkpoint's token cache here the corpus is not read, so data.paths need not be set.
    tokens = runs.tokens_here(cfg, manifest)
    try:
        config.validate(cfg, need_corpus=tokens is None)
    except ConfigError as e:
        data_problem = any(p.startswith("data.") for p in e.problems)
        if tokens is None and manifest.get("data_cache_key") and data_problem:
            raise ConfigError([*e.problems, runs.missing_tokens_hint(cfg, manifest, path.name)]) from None
        raise
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, as_written = elastic.keep_global_batch(
        saved, cfg, manifest, world, path.name if path else str(run_dir)
    )
    changed = config.math_diff(saved, cfg)
    if as_written is not None:  # the checkpoint's global batch, cut anew for this world size: the same maths
        changed = [c for c in changed if c[0] not in _SPLIT_KEYS]
    # A longer (or otherwise changed) run redraws the lr curve from the resumed step on: say how, once.
    note = ""
    if path is not None:
        kept = [int(p.name.removeprefix("step-")) for p in checkpoint.committed(run_dir / "checkpoints")]
        before = schedule.Curve(saved.schedule, saved.optimizer.lr, saved.trainer.max_steps)
        after = schedule.Curve(cfg.schedule, cfg.optimizer.lr, cfg.trainer.max_steps)
        note = schedule.extension_note(before, after, int(manifest.get("step", 0)), kept)
    if changed and not cfg.allow_config_change:
        lines = [f"{k}: {a!r} (saved) -> {b!r}" for k, a, b in changed]
        raise ConfigError(
            [
                "these overrides change the training math of a run in progress:\n      "
                + "\n      ".join(lines + ([f"then {note}"] if note else []))
                + "\n    add allow_config_change=true to continue anyway (the run is then no longer exact)"
            ]
        )
    if path is None:
        if missing_ok:
            return train(cfg)
        raise CheckpointError(f"no valid checkpoint under {run_dir / 'checkpoints'}; nothing to resume")
    problems = []
    # A global batch kept over another world size is checked as the checkpoint's own split (elastic.keep_global_batch).
    if not config.hash_matches(as_written if as_written is not None else cfg, manifest.get("config_hash")):
        problems.append(f"{path}: written by a different configuration (hash {manifest.get('config_hash')})")
    problems += runs.token_problems(cfg, manifest, path.name)
    if problems and not cfg.allow_config_change:
        raise ConfigError([*problems, "add allow_config_change=true to continue anyway"])
    if int(manifest.get("step", 0)) >= cfg.trainer.max_steps:
        return _already_finished(run_dir, int(manifest["step"]), manifest.get("val_loss"))
    # Stopped early stays stopped unless the command line changes early_stopping (none, more patience...):
    # then the run trains on, and its restored counters decide again at the next evaluation.
    if manifest.get("early_stop") and cfg.early_stopping == saved.early_stopping:
        step, val_loss = int(manifest["step"]), manifest.get("val_loss")
        return _already_finished(run_dir, step, val_loss, early_stop=manifest["early_stop"])
    if note:
        log.warning(note)
    return train(cfg, resume_from=path)


def _already_finished(run_dir: Path, step: int, val_loss: Any, early_stop: str = "") -> JobResult:
    """A scheduler re-running `train … resume=auto` on a finished run: say so and change nothing."""
    loss = f", val loss {val_loss:.4f}" if isinstance(val_loss, int | float) else ""
    if early_stop:
        log.info(
            f"{run_dir} already stopped early at step {step}{loss}; nothing to do (to train on, resume with "
            f"early_stopping=none or a larger early_stopping.patience). {early_stop}"
        )
    else:
        log.info(
            f"{run_dir} already finished at step {step}{loss}; nothing to do "
            "(to train on, resume with a larger trainer.max_steps and allow_config_change=true)"
        )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"step": step}
    return JobResult(Outcome.OK, run_dir=run_dir, summary=summary)


# --- archive -------------------------------------------------------------------------------------------


def archive(
    target: str, older_than_days: float, storage_class: str, storage_overrides: list[str]
) -> JobResult:
    """Move a run's old checkpoints in its bucket to a colder storage class (newest and best stay hot)."""
    if target.startswith("s3://"):
        remote = runs.remote_for_url(target, storage_overrides)
    else:
        saved = config.apply_overrides(config.load_yaml(Path(target) / "config.yaml"), storage_overrides)
        remote = runs.open_remote(saved, Path(target))
        if remote is None:
            raise ConfigError([f"{target}: this run has storage=local; archive moves S3 checkpoints only"])
    moved = remote.archive(older_than_days, storage_class)
    log.info(f"archived {len(moved)} checkpoint(s) to {storage_class}: {moved}")
    return JobResult(Outcome.OK, summary={"archived": moved})
