"""Curricula: which training data an optimizer step sees, easy to hard, as a pure function of the step.

`curriculum.name` picks an option registered in CURRICULA (one conf/curriculum/<name>.yaml each):

- none: every step draws uniform windows of model.seq_len tokens from the train split.
- seqlen: short sequences first. The length doubles from start_len up to model.seq_len (a ladder of rungs,
  each a multiple of `bucket`), and a micro-batch at length L holds micro_batch_size x seq_len / L rows, a
  whole number on this ladder, so the tokens per micro-batch and per optimizer step stay exactly constant.
- difficulty: easy windows first. The train split is tiled into fixed windows of seq_len + 1 tokens, each
  scored once (SCORES: length, rarity, model; cached beside the token shards), then cut into n_bins quantile
  bins: the windows sorted by score (ties by position) in groups of equal count. Batches draw from the bins
  introduced so far, easiest first; after the ramp from all of them.

The ramp is counted in optimizer steps (`ramp_steps`); every curriculum keeps the tokens per step constant,
so it is ramp_steps x tokens per step tokens. A pacing (PACINGS) maps p = min(1, step / ramp_steps) to an
amount between the easiest one (start_len; one bin) and all of it (model.seq_len; n_bins):

  linear       a = start + (end - start) * p
  exponential  a = start * (end / start) ** p            (doubles in equal numbers of steps)
  step         a = start + (end - start) * floor(p * (stages - 1)) / (stages - 1)

and the amount is rounded down (to a rung, or a whole number of bins): all the data arrives at step
ramp_steps exactly, never before. `ramping(step)` is True while step `step` still leaves harder data out;
early stopping must not fire then, since validation loss (always at full length, over the whole val split)
can rise as harder data arrives.

seqlen and the rest of the config:
- trainer.micro_batch_size=auto is probed at the full seq_len before training. A rung of length L with
  seq_len / L times the rows holds the same tokens: per-token activations (linears, MLP, norms, logits, the
  fused attention's outputs) take the same memory, and attention, whose work per token grows with the length,
  takes less time (and, unfused, less memory for its L x L scores). The probe's answer fits every rung.
- torch.compile specialises on shapes: each rung costs one more compile (dynamo may turn to one dynamic-shape
  graph at the second), and compile_mode=reduce-overhead / max-autotune captures a CUDA graph with its own
  memory pool per rung. Hence few rungs: log2(seq_len / start_len) + 1, e.g. 5 from 64 to 1024.

score=model reads a previous run directory as data: its config.yaml (yaml.safe_load, the model section only)
and its newest valid checkpoint through greenrun.ckpt.checkpoint (safetensors, weights_only). It scores on
the CPU in batches, and stops with an error once the time spent, or after 5 s the time projected from the
batches done, exceeds score_budget_s: a bigger job wants a smaller reference or score=length|rarity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from greenrun.ckpt import checkpoint
from greenrun.core.fields import maths, plain
from greenrun.core.registry import Registry
from greenrun.data import cache
from greenrun.data.dataset import Dataset, length_scores, rarity_scores
from greenrun.data.sources import DataError
from greenrun.train import model

log = logging.getLogger(__name__)

_EPS = 1e-9  # relative slack when rounding an amount down: 8 * (1/8) must not floor to 0.999...
_SCORE_BATCH = 16  # windows per reference-model forward on the CPU
_CONFIG_BYTES = 1 << 20  # a saved config is a few KiB; anything this big is not one


@dataclass
class CurriculumConfig:
    name: str = maths("none")  # none | seqlen | difficulty
    pacing: str = maths("linear")  # linear | exponential | step: how the ramp adds harder data
    ramp_steps: int = maths(200)  # optimizer steps until all data is in (x tokens/step = the ramp in tokens)
    stages: int = maths(4)  # pacing=step: amounts from easiest to all, both included, held equally long
    start_len: int = maths(64)  # seqlen: tokens per sequence at step 0; doubles up to model.seq_len
    bucket: int = maths(64)  # seqlen: every shorter length is a multiple of this many tokens
    score: str = maths("length")  # difficulty: length | rarity | model (what makes a window hard)
    n_bins: int = maths(4)  # difficulty: quantile bins of the score, added easiest first (>= 2)
    reference: str = maths("", local=True)  # score=model: a previous run directory to score with
    score_budget_s: float = plain(600.0)  # score=model: most seconds of CPU scoring (stops early if over)


class Curriculum(Protocol):
    def batch(self, step: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for micro-batch `slot` of optimizer step `step`'s global batch: a pure function of the
        arguments. Slots number the global batch alike on any number of processes (dataset.global_slot)."""
        ...

    def ramping(self, step: int) -> bool:
        """Whether step `step` still leaves harder data out."""
        ...


# --- pacing: the amount of data p of the way through the ramp ----------------------------------------------

Pacing = Callable[[float, float, float, int], float]
PACINGS: Registry[Pacing] = Registry("curriculum.pacing")


@PACINGS.register("linear")
def linear(p: float, start: float, end: float, stages: int) -> float:
    return start + (end - start) * p


@PACINGS.register("exponential")
def exponential(p: float, start: float, end: float, stages: int) -> float:
    return start * (end / start) ** p


@PACINGS.register("step")
def step(p: float, start: float, end: float, stages: int) -> float:
    level = math.floor(p * (stages - 1) + _EPS)
    return start + (end - start) * level / (stages - 1)


def amount_at(cfg: CurriculumConfig, step: int, start: float, end: float) -> float:
    """The pacing's amount at optimizer step `step` (0-based), from `start` at step 0 to `end` at ramp_steps."""
    p = min(1.0, step / cfg.ramp_steps) if cfg.ramp_steps > 0 else 1.0
    return end if p >= 1.0 else PACINGS.get(cfg.pacing)(p, start, end, cfg.stages)


# --- the options ------------------------------------------------------------------------------------------

CURRICULA: Registry[type] = Registry("curriculum.name")


def build(cfg: CurriculumConfig, ds: Dataset, seq_len: int, micro_batch: int, seed: int) -> Curriculum:
    """The curriculum that hands out the training micro-batches of a run (validation batches stay uniform)."""
    return CURRICULA.get(cfg.name)(cfg, ds, seq_len, micro_batch, seed)


@CURRICULA.register("none")
class Uniform:
    """Every step draws uniform windows of seq_len tokens from the whole train split."""

    def __init__(self, cfg: CurriculumConfig, ds: Dataset, seq_len: int, micro_batch: int, seed: int):
        self.ds, self.seq_len, self.micro_batch, self.seed = ds, seq_len, micro_batch, seed

    @staticmethod
    def problems(cfg: CurriculumConfig, seq_len: int) -> list[str]:
        return []

    def batch(self, step: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ds.batch("train", step, slot, self.micro_batch, self.seq_len, self.seed)

    def ramping(self, step: int) -> bool:
        return False


def ladder(seq_len: int, start_len: int, bucket: int) -> list[int]:
    """seqlen's lengths, shortest first: seq_len, halved while the half is a whole number, a multiple of
    `bucket` and at least start_len."""
    lengths = [seq_len]
    while lengths[0] % 2 == 0 and lengths[0] // 2 >= start_len and (lengths[0] // 2) % bucket == 0:
        lengths.insert(0, lengths[0] // 2)
    return lengths


@CURRICULA.register("seqlen")
class SeqLen(Uniform):
    """Short sequences first, with proportionally more of them: the same tokens per step at every length."""

    def __init__(self, cfg: CurriculumConfig, ds: Dataset, seq_len: int, micro_batch: int, seed: int):
        super().__init__(cfg, ds, seq_len, micro_batch, seed)
        self.cfg = cfg
        # Validation holds start_len to a rung; a config shrunk afterwards (smoke) keeps the rungs that fit.
        self.lengths = ladder(seq_len, max(1, cfg.start_len), max(1, cfg.bucket))

    @staticmethod
    def problems(cfg: CurriculumConfig, seq_len: int) -> list[str]:
        if cfg.bucket < 1:
            return [f"curriculum.bucket: must be >= 1 token, got {cfg.bucket}"]
        if not 1 <= cfg.start_len <= seq_len:
            return [f"curriculum.start_len: must be in [1, model.seq_len={seq_len}], got {cfg.start_len}"]
        starts = ladder(seq_len, 1, cfg.bucket)
        if cfg.start_len in starts:
            return []
        hint = "" if len(starts) > 1 else ", or lower curriculum.bucket so seq_len halves in its multiples"
        return [
            f"curriculum.start_len={cfg.start_len}: lengths double from start_len up to model.seq_len={seq_len}, "
            f"each a multiple of curriculum.bucket={cfg.bucket}, so start_len must be one of "
            f"{', '.join(map(str, starts))}{hint}"
        ]

    def length_at(self, step: int) -> int:
        amount = amount_at(self.cfg, step, self.lengths[0], self.seq_len) * (1 + _EPS)
        return max(n for n in self.lengths if n <= amount)

    def rows_at(self, step: int) -> int:
        return self.micro_batch * self.seq_len // self.length_at(step)  # exact: seq_len / length is 2**k

    def batch(self, step: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.length_at(step)
        return self.ds.batch("train", step, slot, self.rows_at(step), n, self.seed)

    def ramping(self, step: int) -> bool:
        return self.length_at(step) < self.seq_len


@CURRICULA.register("difficulty")
class Difficulty(Uniform):
    """Windows of the fixed tiling in quantile bins of a score, the easiest bin first."""

    def __init__(self, cfg: CurriculumConfig, ds: Dataset, seq_len: int, micro_batch: int, seed: int):
        super().__init__(cfg, ds, seq_len, micro_batch, seed)
        self.cfg = cfg
        key, compute = SCORES.get(cfg.score)(cfg, ds, seq_len)
        scores, fresh = cache.cached_scores(ds, cfg.score, seq_len, key, compute)
        n = len(scores)
        if n < max(1, cfg.n_bins):
            raise DataError(
                f"curriculum=difficulty: the train split tiles into {n} windows of {seq_len + 1} tokens, fewer "
                f"than curriculum.n_bins={cfg.n_bins}: lower n_bins or model.seq_len, or add text"
            )
        self.order = np.argsort(scores, kind="stable")  # easiest first; equal scores by position
        self.ends = [n * k // cfg.n_bins for k in range(1, cfg.n_bins + 1)]
        name = cache.scores_name(cfg.score, seq_len, key)
        log.info(
            f"curriculum=difficulty: {n:,} windows by {cfg.score} ({'scored now' if fresh else 'cached'}: "
            f"{ds.cache_path / name}.npy), {cfg.n_bins} bins over {cfg.ramp_steps} steps ({cfg.pacing})"
        )

    @staticmethod
    def problems(cfg: CurriculumConfig, seq_len: int) -> list[str]:
        problems = SCORES.problems(str(cfg.score))
        if cfg.n_bins < 2:
            problems.append(f"curriculum.n_bins: must be >= 2 (1 bin is curriculum=none), got {cfg.n_bins}")
        if cfg.score == "model":
            run = Path(cfg.reference).expanduser()
            if not cfg.reference:
                problems.append(
                    "curriculum.score=model needs curriculum.reference=RUN_DIR: a finished run whose newest "
                    "checkpoint scores the windows (train a small model on the same data first)"
                )
            elif not (run / "config.yaml").is_file() or not (run / "checkpoints").is_dir():
                problems.append(
                    f"curriculum.reference={cfg.reference}: not a run directory (no config.yaml and "
                    f"checkpoints/ in {run})"
                )
            if cfg.score_budget_s <= 0:
                problems.append(f"curriculum.score_budget_s: must be > 0 seconds, got {cfg.score_budget_s}")
        return problems

    def bins_at(self, step: int) -> int:
        amount = amount_at(self.cfg, step, 1, self.cfg.n_bins) * (1 + _EPS)
        return min(self.cfg.n_bins, max(1, math.floor(amount)))

    def batch(self, step: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.order[: self.ends[self.bins_at(step) - 1]]
        return self.ds.pool_batch(pool, step, slot, self.micro_batch, self.seq_len, self.seed)

    def ramping(self, step: int) -> bool:
        return self.bins_at(step) < self.cfg.n_bins


# --- scores: (cache key, how to compute one float per window of the tiling; higher = harder) ---------------

Score = Callable[[CurriculumConfig, Dataset, int], tuple[str, Callable[[], np.ndarray]]]
SCORES: Registry[Score] = Registry("curriculum.score")


@SCORES.register("length")
def _length(cfg: CurriculumConfig, ds: Dataset, seq_len: int) -> tuple[str, Callable[[], np.ndarray]]:
    return "", lambda: length_scores(ds, seq_len)


@SCORES.register("rarity")
def _rarity(cfg: CurriculumConfig, ds: Dataset, seq_len: int) -> tuple[str, Callable[[], np.ndarray]]:
    return "", lambda: rarity_scores(ds, seq_len)


@SCORES.register("model")
def _model(cfg: CurriculumConfig, ds: Dataset, seq_len: int) -> tuple[str, Callable[[], np.ndarray]]:
    """The reference's mean loss over each window: keyed by its weights' sha256 and its architecture."""
    ckpt, ref = reference(cfg.reference, ds, seq_len)
    weights = checkpoint.read_manifest(ckpt)["files"]["model.safetensors"]["sha256"]
    key = hashlib.sha256(json.dumps([weights, dataclasses.asdict(ref)]).encode()).hexdigest()
    return key, lambda: model_losses(ckpt, ref, ds, seq_len, cfg.score_budget_s)


def reference(run_dir: str, ds: Dataset, seq_len: int) -> tuple[Path, model.ModelConfig]:
    """(newest valid checkpoint, model config) of a previous run, checked to read this run's windows."""
    run, where = Path(run_dir).expanduser(), f"curriculum.reference={run_dir}"
    ref = _saved_model_config(run / "config.yaml", where)
    ckpt = checkpoint.latest_valid(run / "checkpoints", warn=log.warning)
    if ckpt is None:
        raise DataError(
            f"{where}: no valid checkpoint in {run / 'checkpoints'}; train the reference run first"
        )
    trained_on = str(checkpoint.read_manifest(ckpt).get("data_cache_key", ""))
    if trained_on != ds.cache_key:
        raise DataError(
            f"{where}: trained on the token cache {trained_on[:16] or '(unknown)'}, this run reads "
            f"{ds.cache_key[:16]}: its token ids mean other text; train the reference with the same data.* and "
            "model.vocab_size"
        )
    if ref.seq_len < seq_len:
        raise DataError(
            f"{where}: its model.seq_len={ref.seq_len} is shorter than this run's windows ({seq_len} tokens)"
        )
    return ckpt, ref


def _saved_model_config(path: Path, where: str) -> model.ModelConfig:
    """The `model` section of a saved config.yaml, read as plain data and checked field by field."""
    try:
        blob = path.read_bytes()
        raw = yaml.safe_load(blob.decode("utf-8")) if len(blob) <= _CONFIG_BYTES else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{where}: cannot read {path} as a saved config ({type(e).__name__})") from None
    section = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise DataError(f"{where}: {path} is not a saved greenrun config (no model section)")
    default = model.ModelConfig()
    bad = []
    for key, value in section.items():
        want = type(getattr(default, key, None))
        if not hasattr(default, key) or not (type(value) is want or (want is float and type(value) is int)):
            bad.append(f"model.{key}={value!r}")
    if bad:
        raise DataError(f"{where}: {path} holds {', '.join(bad)}, not fields of today's model config")
    return model.ModelConfig(**section)


@torch.no_grad()
def model_losses(
    ckpt: Path, ref: model.ModelConfig, ds: Dataset, seq_len: int, budget_s: float
) -> np.ndarray:
    """Each window's mean next-token loss under the reference model, in fp32 on the CPU."""
    net = model.GPT(ref)
    weights, _, _, _ = checkpoint.load(ckpt)  # verified; safetensors and weights_only: no code runs
    net.load_state_dict(weights)
    net.eval()
    hidden: list[torch.Tensor] = []
    # The forward without targets keeps only the last position's logits: the final norm's output has them all.
    hook = net.ln_f.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    n, t0 = int(ds.tiles(seq_len)[-1]), time.perf_counter()
    losses = np.empty(n)
    try:
        for lo in range(0, n, _SCORE_BATCH):
            hi = min(n, lo + _SCORE_BATCH)
            rows = torch.from_numpy(ds.tile_rows(np.arange(lo, hi), seq_len))
            net(rows[:, :-1])
            logits = F.linear(hidden.pop(), net.lm_head_weight)[..., : ref.vocab_size].float()
            loss = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
            losses[lo:hi] = loss.mean(dim=1).numpy()
            spent = time.perf_counter() - t0
            if spent > budget_s or (spent > 5 and spent * n / hi > budget_s):
                raise DataError(
                    f"curriculum.score=model: {hi:,} of {n:,} windows scored in {spent:.0f} s, about "
                    f"{spent * n / hi:.0f} s for all, over curriculum.score_budget_s={budget_s:g}: raise it, "
                    "score with a smaller reference run, or use curriculum.score=length|rarity"
                )
    finally:
        hook.remove()
    return losses


# --- validation -------------------------------------------------------------------------------------------


def validate(cfg: CurriculumConfig, seq_len: int, max_steps: int) -> list[str]:
    """Every problem of the curriculum config, each naming its key and how to fix it."""
    problems = CURRICULA.problems(str(cfg.name))
    if problems or cfg.name == "none":
        return problems
    problems += PACINGS.problems(str(cfg.pacing))
    if not 1 <= cfg.ramp_steps <= max_steps:
        problems.append(
            f"curriculum.ramp_steps: must be in [1, trainer.max_steps={max_steps}] so the run reaches all its "
            f"data, got {cfg.ramp_steps}"
        )
    if cfg.stages < 2:
        problems.append(
            f"curriculum.stages: must be >= 2 (the easiest amount and all of it), got {cfg.stages}"
        )
    return problems + CURRICULA.get(cfg.name).problems(cfg, seq_len)
