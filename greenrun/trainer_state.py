"""What a Trainer saves, loads and leaves behind: its state for a checkpoint, the snapshot the checkpointer
writes (into host buffers reused from save to save), a resume from a checkpoint, and the weight exports.

A base class of Trainer: the loop lives in trainer.py; these methods read the parts its __init__ built.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from greenrun import runs
from greenrun.ckpt import checkpoint, export, sharded
from greenrun.config import math_hash
from greenrun.runtime import distributed
from greenrun.train import early_stopping

log = logging.getLogger("greenrun.trainer")


class TrainerState:
    """state_dict / load_state_dict / snapshot / resume_from / exports, for Trainer."""

    def state_dict(self) -> dict[str, Any]:
        self.guard.settle()  # every step up to now decided: its counts are saved, and `stop` raises first
        # Under fsdp a collective: rank 0 gets the full state in host memory, the other ranks empty dicts.
        model_state, optim_state = self.parallel.full_state(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, "trainer": self._trainer_state()}

    def _trainer_state(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "first_val": self.first_val,
            "wall_s": self.wall_before + (time.perf_counter() - self._train_t0 if self._train_t0 else 0.0),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "early_stopping": self.stopper.state_dict(),
            "nonfinite": self.guard.state_dict(),
            "accounts": self.accounts.state_dict(),  # the ledger's totals and the budgets' warnings
        }

    def load_state_dict(
        self,
        model_state: dict | None,
        optim_state: dict | None,
        trainer_state: dict,
        sharded_from: Path | None = None,
    ) -> None:
        """The full state, or with sharded_from a sharded checkpoint read straight into this rank's shards."""
        try:
            if sharded_from is not None:
                sharded.load_sharded(
                    sharded_from,
                    self.model,
                    self.optimizer,
                    checkpoint.load_pt(sharded_from, sharded.OPTIM_META, "cpu"),
                )
            else:
                self.parallel.load_full_state(self.model, self.optimizer, model_state, optim_state)
        except (ValueError, KeyError) as e:  # torch names the mismatch, not what to do about it
            raise checkpoint.CheckpointError(
                f"the checkpoint's optimizer state does not fit optimizer={self.cfg.optimizer.name} ({e}); it was "
                "written by another optimizer or by a greenrun before 2026-12-02, whose AdamW also decayed the "
                "embeddings: resume it with the greenrun that wrote it, or start a new run"
            ) from e
        self.step = int(trainer_state["step"])
        self.first_val = trainer_state.get("first_val")
        self.wall_before = float(trainer_state.get("wall_s", 0.0))
        if trainer_state["scaler"]:
            self.scaler.load_state_dict(trainer_state["scaler"])
        self.stopper.load_state_dict(trainer_state.get("early_stopping", {}))
        self.guard.load_state_dict(trainer_state.get("nonfinite", {}))
        self.accounts.load_state_dict(
            trainer_state.get("accounts", {}),
            seconds_before=self.wall_before,
            tokens_before=self.step * self.tokens_per_step,
        )
        rng = trainer_state["rng"]
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _reserve_staging(self) -> None:
        t0 = time.perf_counter()
        state = self.state_dict()
        unique, _ = checkpoint.unique_tensors(state["model"])
        n = self.stager.reserve(unique, state["optimizer"], state["trainer"])
        log.debug(
            f"checkpoint staging: {n / 2**30:.2f} GiB of host buffers in {time.perf_counter() - t0:.2f} s"
        )

    def snapshot(self) -> checkpoint.Snapshot | checkpoint.Pending | None:
        if self.parallel.sharded_checkpoints:
            return self._sharded_snapshot()
        state = self.state_dict()
        if not self.dist.is_main:  # fsdp: this rank's part of the gather is done; rank 0 writes
            return None
        unique, aliases = checkpoint.unique_tensors(state["model"])
        # The guard stops a non-finite step before its update; an update that overflowed is caught here.
        if not early_stopping.all_finite(unique.values()):
            raise early_stopping.NonFiniteError(
                f"the weights are not finite after step {self.step}: not checkpointing them. Lower optimizer.lr"
            )
        # Into host buffers allocated at the first save and reused by every later one (ckpt/staging.py).
        return self.stager.snapshot(
            step=self.step,
            model=unique,
            aliases=aliases,
            optimizer=state["optimizer"],
            trainer=state["trainer"],
            meta=self._manifest_meta(),
        )

    def _manifest_meta(self) -> dict[str, Any]:
        return {
            "config_hash": math_hash(self.cfg),
            "world_size": self.dist.world_size,
            # How the global batch was split: a resume on another world size keeps it (job.continue_run).
            "micro_batch_size": self.cfg.trainer.micro_batch_size,
            "grad_accum_steps": self.cfg.trainer.grad_accum_steps,
            "data_cache_key": self.data.cache_key,
            "val_loss": self.last_val,
            "early_stop": self.early_stop.reason if self.early_stop is not None else "",
        }

    def _sharded_snapshot(self) -> checkpoint.Pending | None:
        """Every rank, in the training thread: DCP writes this rank's shards into rank 0's temp dir (a
        collective, so never on the writer thread); rank 0 gets what its background commit needs."""
        self.guard.settle()
        local = [t.to_local() if hasattr(t, "to_local") else t for t in self.model.state_dict().values()]
        if distributed.any_flag(not early_stopping.all_finite(local)):
            raise early_stopping.NonFiniteError(
                f"the weights are not finite after step {self.step}: not checkpointing them. Lower optimizer.lr"
            )
        root = self.run_dir / "checkpoints"
        tmp = [None]
        if self.dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            tmp = [checkpoint.temp_dir(root, checkpoint.step_dir(root, self.step).name)]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(tmp, src=0)  # one directory, named by the writer
        optim_meta = sharded.save(self.model, self.optimizer, tmp[0])
        distributed.barrier()  # every rank's shards are on disk before rank 0 hashes them
        if not self.dist.is_main:
            return None
        return checkpoint.Pending(self.step, tmp[0], optim_meta, self._trainer_state(), self._manifest_meta())

    def resume_from(self, path: Path) -> None:
        # fsdp scatters the full state from host memory into each rank's shards
        where = "cpu" if self.parallel.sharded else self.device
        if self.parallel.sharded and sharded.is_sharded(checkpoint.read_manifest(path)):
            # Each rank reads only its own slices, on any world size; nothing is gathered anywhere.
            if problem := checkpoint.verify(path):
                raise checkpoint.CheckpointError(problem)
            trainer_state = checkpoint.load_pt(path, "trainer.pt", "cpu")
            self.load_state_dict(None, None, trainer_state, sharded_from=path)
        else:
            model_state, optim_state, trainer_state, _ = checkpoint.load(path, map_location=where)
            self.load_state_dict(model_state, optim_state, trainer_state)
        # What the killed process spent past this checkpoint, read before its records are dropped.
        event = self.accounts.on_resume(path, self.step, self.metrics_path)
        if self.dist.is_main:
            runs.truncate_metrics(self.metrics_path, self.step)
        self._log_event(event)

    def export_weights(self) -> Path | None:
        """Model-only weights in checkpoint.weights_dtype for inference or fine-tuning: half the bytes in bf16/fp16.

        Every rank calls it (under fsdp the weights are gathered); rank 0 writes and returns the path."""
        c = self.cfg.checkpoint
        weights = self.parallel.full_model_state(self.model)
        if not self.dist.is_main:
            return None
        return export.write(self.run_dir, weights, self.step, c.weights_dtype, c.keep_exports)

    def _export_path(self, step: int) -> Path:
        return export.export_path(self.run_dir, step, self.cfg.checkpoint.weights_dtype)

    def export_best(self) -> Path | None:
        """The weights of a new best evaluation, written by a background thread (final_export waits for it)."""
        c = self.cfg.checkpoint
        weights = self.parallel.full_model_state(self.model)  # every rank: under fsdp a gather
        if not self.dist.is_main:
            return None
        return self.exports.submit(self.run_dir, weights, self.step, c.weights_dtype, c.keep_exports)

    def final_export(self) -> Path:
        """The export a run leaves: with early_stopping.restore_best the best evaluation's weights, exported
        when it was reached (_watch); else the weights now."""
        self.exports.wait()
        best = self.stopper.best_step if self.cfg.early_stopping.restore_best else None
        have = best is not None and self.dist.is_main and self._export_path(best).is_file()
        if distributed.any_flag(have):  # rank 0's answer, on every rank: none of them gathers the weights
            return self._export_path(best) if self.dist.is_main else None
        if (
            best is not None and self.dist.is_main
        ):  # only after a resume that went another way than the run it continued
            log.warning(f"the best weights (step {best}) are gone from export/: exporting step {self.step}'s")
        return self.export_weights()
