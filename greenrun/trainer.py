"""The training loop: build the parts, step, evaluate, checkpoint. Reads top to bottom like a script.

Batches are a pure function of (seed, step, slot), the slot numbering the global batch's micro-batches alike
on any number of processes, and the schedule is a pure function of the step, so a checkpoint of model,
optimizer, scaler, step and RNG states is all exact resume needs, on this world size or another.

Nothing in a training step draws from the global RNGs, whose states the checkpoint keeps for rank 0 only:
the model trains without dropout (model.dropout=0), every batch comes from its own (seed, step, slot)
generator, and the sample at the end has its own. Randomness added to a step (dropout > 0, sampling in the
loop) must come from a generator seeded by (seed, step, slot) too, never the global state: every rank
restores rank 0's, and how many draws a step takes from it follows the accumulation, so a resume on another
world size would diverge.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from greenrun import accounting, data
from greenrun.ckpt import checkpoint, export
from greenrun.ckpt.pipeline import Checkpointer
from greenrun.ckpt.uploader import Uploader
from greenrun.config import CUDA_GRAPH_MODES, Config
from greenrun.core import fs
from greenrun.core.output import Reporter
from greenrun.data.dataset import global_slot
from greenrun.interop.sampling import generate_text
from greenrun.runtime import distributed, energy, hardware, profiling, sinks
from greenrun.runtime.spot import PreemptionWatcher
from greenrun.train import (
    activation_checkpointing,
    curriculum,
    early_stopping,
    model,
    optimizer,
    parallel,
    precision,
)
from greenrun.train.schedule import lr_at
from greenrun.trainer_state import TrainerState

log = logging.getLogger(__name__)


class Trainer(TrainerState):
    """Builds every part from a typed Config in __init__; train() runs the loop; close() in a finally.

    `data` is the dataset to train on (built from cfg.data when None); `uploader` mirrors each committed
    checkpoint (the writer's only). trainer.micro_batch_size must be a number: `auto` is resolved by
    greenrun.job before a Trainer exists, so the probe sees an empty device.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        dist: distributed.Dist | None = None,
        data_set: data.Dataset | None = None,
        uploader: Uploader | None = None,
        reporter: Reporter | None = None,
    ):
        t = cfg.trainer
        if not isinstance(t.micro_batch_size, int):
            raise ValueError(
                f"trainer.micro_batch_size={t.micro_batch_size!r}: resolve `auto` first "
                "(greenrun.job.resolve_micro_batch) or give a number"
            )
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = dist or distributed.setup(t.device)
        self.device = self.dist.device
        self.reporter = reporter or Reporter(enabled=self.dist.is_main)
        precision.configure_matmul(cfg.precision)
        if self.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(hardware.cpu_threads(t.cpu_threads, local))
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        self.data = data_set or data.build(cfg.data, cfg.model.vocab_size, seq_len=cfg.model.seq_len)
        self.curriculum = curriculum.build(
            cfg.curriculum, self.data, cfg.model.seq_len, t.micro_batch_size, t.seed
        )
        self.precision = precision.get(cfg.precision.name)
        self.model = model.GPT(cfg.model).to(self.device)
        self.recompute = activation_checkpointing.apply(self.model, cfg.activation_checkpointing)
        self.prepared = self.precision.prepare(self.model, cfg.precision)  # e.g. the linears now in fp8
        self.parallel = parallel.build(cfg.distributed, self.dist.world_size)
        self.parallel.shard(
            self.model, parallel.param_dtype(cfg.precision.name)
        )  # fsdp: before the optimizer
        self.optimizer = optimizer.build(cfg.optimizer, self.model)
        self.scaler = self.precision.scaler(self.device)
        self.autocast = lambda: self.precision.autocast(self.device)

        self.train_model: torch.nn.Module = self.model
        wants_compile = t.compile if t.compile is not None else self.device.type == "cuda"
        # CUDA graphs reuse their output buffers on every replay: each micro-step must be marked as new.
        self.cuda_graphs = False
        if wants_compile or self.precision.must_compile(self.prepared):
            mode = None if t.compile_mode == "default" else t.compile_mode
            self.train_model = torch.compile(self.model, mode=mode)
            self.cuda_graphs = self.device.type == "cuda" and t.compile_mode in CUDA_GRAPH_MODES
        self.train_model = self.parallel.wrap(self.train_model, self.device)  # ddp under torchrun

        self.step = 0
        self.tokens_per_step = (
            t.micro_batch_size * cfg.model.seq_len * t.grad_accum_steps * self.dist.world_size
        )
        self.exports = export.BackgroundExports()  # restore_best's exports, written off the loop
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self.run_dir / "checkpoints",
            uploader=uploader if self.dist.is_main else None,
            writer=self.dist.is_main,
            agree=distributed.any_flag,
            collective=self.parallel.sharded,  # fsdp: every rank takes part in gathering the state
            barrier=distributed.barrier,
        )
        # Only a CUDA run has GPUs to meter; on a CPU, NVML has nothing to say about this process.
        self.energy = energy.EnergyMeter(cfg.energy, gpus=None if self.device.type == "cuda" else [])
        gpus = self.dist.world_size if self.device.type == "cuda" else 0
        self.accounts = accounting.Accounts(cfg, self.dist, self.energy, gpus=gpus)  # ledger, budgets, window
        self.stopped_by = ""  # why a budget ended this process's loop ("" = it did not)
        self.window_exit = ""  # why the training window sent this process away (window.outside=exit)
        self.profiler = profiling.Windows(
            t.profile_every if self.dist.is_main else 0,
            t.profile_steps,
            self.run_dir / "profile",
            self.device,
            log.info,
        )
        self.flops_per_token = model.flops_per_token(cfg.model)
        self.peak_flops = hardware.peak_bf16_flops(self.device) * self.dist.world_size
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # logger=: where the records go besides metrics.jsonl (TensorBoard, MLflow, W&B); rank 0 only
        self.sinks = sinks.Sinks(cfg.logger, self.run_dir, cfg, enabled=self.dist.is_main)
        self.first_val: float | None = None
        self.last_val: float | None = None
        self.upload_grace_s: float | None = None  # how long close() waits for uploads (None = until done)
        self.wall_before = 0.0  # seconds earlier processes of this run trained (from the checkpoint)
        self._train_t0: float | None = None
        self.stager = checkpoint.Stager()  # the snapshot's host buffers, allocated once
        self.stopper = early_stopping.build(cfg.early_stopping)
        self.early_stop: early_stopping.Decision | None = None  # the decision that ended this process's loop
        self.guard = early_stopping.NonFiniteGuard(t.on_nonfinite)
        # Fused Adam/AdamW skip a flagged update inside their kernel (the `found_inf` a GradScaler also uses),
        # so the non-finite check needs no host sync per step. Others, and fp16's scaler, check on the host.
        self.skips_on_device = (
            isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW)
            and all(g.get("fused") for g in self.optimizer.param_groups)
            and not self.scaler.is_enabled()
            and not self.parallel.sharded  # its found_inf is a plain tensor; fsdp's parameters are DTensors
        )

    # --- one optimizer step ---------------------------------------------------------------------------

    def train_step(self, sync: bool = True) -> dict[str, float]:
        """One optimizer step: {"lr"}, and with `sync` {"loss", "grad_norm"} too (read from the device).

        Where the optimizer drops a non-finite update on the device (skips_on_device), a step without `sync`
        never waits for the GPU: the host queues the next step while this one runs. The loop syncs only on
        the steps it logs; every checkpoint settles the pending checks first (state_dict).
        """
        t = self.cfg.trainer
        lr = lr_at(self.step, self.cfg.schedule, self.cfg.optimizer.lr, t.max_steps)
        for group in self.optimizer.param_groups:  # a group may run at a multiple of the schedule (muon)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.train_model.train()
        if self.cuda_graphs:
            # A graph replays into memory it owns, so a .grad that autograd took over from a graph's output
            # would be overwritten by the next micro-step (pytorch/pytorch#169545): with every .grad already
            # allocated, backward adds into it in place instead.
            for p in self.model.parameters():
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum_steps):
            x, y = self._batch("train", self.step, micro)
            last = micro == t.grad_accum_steps - 1
            with self.parallel.sync_grads(self.train_model, last):  # reduce gradients at the last micro-step
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    _, loss = self.train_model(x, y)
                loss = loss / t.grad_accum_steps  # the sum over micro-batches is the mean of the big batch
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")
        )
        if isinstance(grad_norm, DTensor):  # fsdp: the norm over every shard, the same on every rank
            grad_norm = grad_norm.full_tensor()
        check_norm = not self.scaler.is_enabled()
        if self.skips_on_device:
            self.optimizer.found_inf = self.guard.watch(
                self.step + 1, total, grad_norm, check_norm=check_norm
            )
            self.optimizer.step()
        else:  # the step's one device-to-host sync, before the update: a non-finite step never reaches the weights
            apply, _, _ = self.guard.check(self.step + 1, total, grad_norm, check_norm=check_norm)
            if apply:
                self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
        self.step += 1  # a skipped step too: batches follow the step, so retrying it would fail again
        if not sync:
            return {"lr": lr}
        loss_value, norm_value, _ = self.guard.settle()
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value}

    def _batch(self, split: str, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-step `micro` of this process: train draws its global slot (the same sequences on any world
        size); validation batch `step` is one of the evaluation's, whichever rank computes it."""
        t = self.cfg.trainer
        if split == "train":  # the curriculum picks training data; validation stays uniform at full length
            x, y = self.curriculum.batch(step, global_slot(micro, self.dist.rank, self.dist.world_size))
        else:
            x, y = self.data.batch(split, step, micro, t.micro_batch_size, self.cfg.model.seq_len, t.seed)
        if self.device.type == "cuda":
            # A copy from pageable memory first waits for the GPU to drain its queue, so the host could never
            # run ahead of the kernels; from pinned memory (cached by torch's host allocator) it is queued.
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over validation batches 0 .. eval_batches - 1, shared out over the ranks: the same
        batches, so the same number up to float sums, on any number of processes."""
        self.train_model.eval()
        n, total = self.cfg.trainer.eval_batches, torch.zeros((), device=self.device)
        # Under fsdp every forward is a collective: a rank with one batch fewer runs a spare one, uncounted.
        share = -(-n // self.dist.world_size) if self.parallel.sharded else 0
        for i in range(self.dist.rank, max(n, share * self.dist.world_size), self.dist.world_size):
            x, y = self._batch("val", min(i, n - 1), 0)
            with self.autocast():
                _, loss = self.model(x, y)
            if i < n:
                total += loss.float()
        return (distributed.total(total) / n).item()

    # --- the loop ---------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        t = self.cfg.trainer
        stop_at = t.stop_at_step or t.max_steps
        start_step, t0 = self.step, time.perf_counter()
        self._train_t0 = t0
        self.sinks.begin(self.step)
        window_t, window_step = t0, self.step
        preempted = ""
        if self.step == 0:
            if self.dist.is_main:  # a fresh start: lines of an attempt killed before its first checkpoint go
                self.metrics_path.unlink(missing_ok=True)
            self._evaluate_and_log({"step": 0, "tokens": 0})
        self.reporter.start(total=t.max_steps, completed=self.step)
        self.energy.start()
        if why := self.accounts.outside_window(force=True):
            window_t = self._outside_window(why) or window_t
        with PreemptionWatcher(self.cfg.spot, on_abort=log.warning) as watcher:
            while self.step < stop_at and not self.window_exit:
                upcoming = self.step + 1
                logged = upcoming % t.log_interval == 0 or upcoming % t.eval_interval == 0
                with self.profiler.step(self.step):
                    stats = self.train_step(sync=logged or upcoming in (stop_at, t.max_steps))
                if self.step == start_step + 1 and self.checkpointer.writer and not self.parallel.sharded:
                    self._reserve_staging()  # once the optimizer state exists: no save pays the allocation
                record = {"step": self.step, "tokens": self.step * self.tokens_per_step, **stats}
                last = self.step in (stop_at, t.max_steps)
                if self.step % t.log_interval == 0 or last or self.step % t.eval_interval == 0:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    record["elapsed_s"] = self.wall_before + now - t0  # training seconds of the whole run
                    record["tok_per_s"] = (
                        (self.step - window_step) * self.tokens_per_step / max(now - window_t, 1e-9)
                    )
                    if self.peak_flops:
                        record["mfu"] = record["tok_per_s"] * self.flops_per_token / self.peak_flops
                    joules = self.energy.read()
                    if joules is not None:  # this process's joules so far, as the meter read them
                        record["joules"] = joules
                    # The whole run's kWh, CO2e and $ into the record; a spent budget (action=stop) ends the run.
                    tokens = (self.step - window_step) * self.tokens_per_step
                    self.stopped_by = self.accounts.log_window(record, tokens) or self.stopped_by
                    window_t, window_step = now, self.step
                    if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                        self._evaluate_and_log(record)
                    else:
                        self._log(record)
                # Every rank must take the same branch: decisions come from rank 0's flag and clock.
                if distributed.any_flag(watcher.requested):
                    self.reporter.stop()
                    preempted = watcher.reason or "preemption signal"
                    self.accounts.add_window(
                        0
                    )  # the energy up to the signal is the run's (the steps are not)
                    self._log_event({"event": "preempt", "step": self.step, "reason": preempted})
                    log.warning(f"{preempted}: writing an emergency checkpoint at step {self.step}")
                    # A second signal or the watchdog aborts the uploads first: none may stay open.
                    watcher.on_abort = self.checkpointer.abort_emergency
                    emergency = self.checkpointer.emergency(self.snapshot, watcher.remaining_s)
                    self.upload_grace_s = 0.0  # the deadline is spent: close() must not wait on uploads
                    watcher.finished()
                    if emergency.message:
                        (log.warning if emergency.safe else log.error)(emergency.message)
                    break
                if self.early_stop is not None:  # decided at this step's evaluation, alike on every rank
                    break
                upload_stop = (
                    self.checkpointer.upload_stop
                )  # storage.on_failed_uploads=stop, rank 0's uploader
                if distributed.any_flag(upload_stop is not None):
                    self.stopped_by = upload_stop or "checkpoint uploads are failing (rank 0's uploader)"
                    self.upload_grace_s = 0.0  # the bucket is unreachable: the exit must not wait on it
                if self.stopped_by:  # a spent budget or a dead bucket: the final checkpoint below, then exit
                    log.warning(f"stopping at step {self.step}: {self.stopped_by}")
                    break
                if why := self.accounts.outside_window():
                    if last or self.cfg.window.outside == "exit":
                        self.window_exit = why  # the final checkpoint below, then exit 75
                        break
                    self.checkpointer.save(self.snapshot, wait=True)  # the work so far is safe first
                    window_t = self._outside_window(why)
                if not last:
                    self.checkpointer.maybe_save(self.step, self.snapshot)
        self.reporter.stop()
        self.profiler.close(self.step)  # a window the run ended inside
        if not preempted:
            self.checkpointer.save(self.snapshot, wait=True)
        wall = time.perf_counter() - t0
        trained_tokens = (self.step - start_step) * self.tokens_per_step
        self.accounts.add_window(0)  # the last window: the final save's energy
        joules = self.energy.read()
        self.energy.close()
        return {
            "energy": energy.account(
                joules, wall, self.dist.world_size if self.device.type == "cuda" else 0, self.cfg.energy
            ),
            "j_per_token": energy.per_token(joules, trained_tokens),
            "step": self.step,
            "finished": self.step >= t.max_steps or self.early_stop is not None,
            # Why and where early stopping ended the run, with the best evaluation (None: it did not).
            "early_stop": dataclasses.asdict(self.early_stop) if self.early_stop is not None else None,
            # The whole run's kWh, kgCO2e, $, GPU-hours and tokens, every process and the price of preemption.
            "ledger": self.accounts.summary(),
            "budget_stop": self.stopped_by,  # why a budget ended the run ("" = none did)
            "window_exit": self.window_exit,  # why it left to wait outside its training window ("" = it did not)
            "skipped_steps": self.guard.skipped,  # steps whose non-finite update trainer.on_nonfinite=skip dropped
            "preempted": preempted,
            "first_val_loss": self.first_val,
            "val_loss": self.last_val,
            "tokens": self.step * self.tokens_per_step,
            "wall_s": wall,  # this process
            "run_wall_s": self.wall_before + wall,  # every process of the run, as tokens are counted
            "tok_per_s": trained_tokens / max(wall, 1e-9),
            "save_blocked_s": self.checkpointer.blocked_s,
            # Where checkpoints got: per checkpoint and counted (None = no bucket); waits for the last upload.
            "remote": self.checkpointer.remote_report(wait=not preempted),
            # After a preemption: bucket | local | none, where the emergency checkpoint is committed ("" else).
            "emergency": emergency.where if preempted else "",
            "emergency_s": emergency.timings if preempted else {},
        }

    def _outside_window(self, why: str) -> float | None:
        """window.outside=wait: wait here for the window (the idle time is billed in the ledger); the new start
        of the throughput window. With exit, the loop ends after its final checkpoint."""
        if self.cfg.window.outside == "exit":
            self.window_exit = why
            return None
        log.warning(f"{why}: waiting at step {self.step} (window.outside=wait)")
        self.accounts.wait_for_window()
        return time.perf_counter()

    def _log_event(self, event: dict[str, Any]) -> None:
        if self.dist.is_main:  # resume and preempt markers, for greenrun report
            fs.append(self.metrics_path, json.dumps(event) + "\n")

    def _evaluate_and_log(self, record: dict[str, Any]) -> None:
        record["val_loss"] = self.evaluate()
        self.last_val = record["val_loss"]
        if self.first_val is None and record["step"] == 0:
            self.first_val = record["val_loss"]
        if record["step"] > 0:  # the untrained model's loss is no baseline to stop against
            self._watch(record["val_loss"])
            ramping = self.curriculum_ramping(self.step)
            self.stopped_by = self.accounts.on_eval(record["val_loss"], ramping) or self.stopped_by
        self._log(record)

    def _watch(self, val_loss: float) -> None:
        decision = self.stopper.update(val_loss, self.step, self.curriculum_ramping(self.step))
        if decision.improved and self.cfg.early_stopping.restore_best:  # every rank: fsdp gathers the weights
            self.export_best()  # export/ holds the best weights so far: they outlive a kill or a resume
        if decision.stop:
            self.early_stop = decision

    def curriculum_ramping(self, step: int) -> bool:
        """Whether a curriculum still adds harder data at `step`: early stopping never fires while it does.

        A pure function of the step (greenrun.train.curriculum), so every rank and a resumed run agree.
        """
        return self.curriculum.ramping(step)

    def _log(self, record: dict[str, Any]) -> None:
        self.reporter.update(record)
        if self.dist.is_main:
            fs.append(self.metrics_path, json.dumps(record) + "\n")  # refuses a symlink: never writes outside
            self.sinks.write(record)

    def sample(self, prompt: str | None = None) -> str:
        n = self.cfg.trainer.sample_tokens
        if n <= 0:
            return ""
        prompt = prompt or self.cfg.trainer.sample_prompt or data.sample_prompt(self.cfg.data)
        # The path `greenrun sample` takes too: a checkpoint sampled with the run's seed prints the same text.
        return generate_text(
            self.model, self.data, prompt, n, seed=self.cfg.trainer.seed, autocast=self.autocast
        )

    def close(self, together: bool = False) -> None:
        """Stop the threads, wait for exports and uploads, leave the process group (with `together`, after
        every rank has got here: a normal end)."""
        self.reporter.stop()
        self.profiler.close(self.step)
        self.sinks.close()
        try:
            self.exports.wait()
        except OSError as e:  # final_export reports it where it matters; close must still release the rest
            log.error(f"the export of the best weights failed: {e}")
        self.checkpointer.close(upload_timeout=self.upload_grace_s)
        distributed.teardown(together)
