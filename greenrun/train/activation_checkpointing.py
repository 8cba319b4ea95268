"""Activation checkpointing plans: which transformer blocks recompute their activations in backward.

A plan is a list with one entry per block, each "none" | "full" | "selective", which the model
reads from ``model.recompute`` (see ``greenrun.train.model.run_block``). Notation used below, for one
micro-batch: A = everything autograd saves for one block, I = one block's input (the residual
stream, about A/16 in fp32 and A/9 under bf16 autocast; see ``greenrun.train.memory``).

- "none" block: keeps A until backward.
- "full" block: keeps only I; backward re-runs the block's forward (about +1/3 of its step time)
  and holds its A briefly, one block at a time.
- "selective" block: keeps I plus the matmul and attention outputs (about 0.7 A) and recomputes only
  the cheap elementwise ops (LayerNorm, GELU, residual adds), so it costs almost no extra time.

Each policy is one plan function below, registered in POLICIES under its name (L blocks, block 0 is
nearest the embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from greenrun.core.fields import plain
from greenrun.core.registry import Registry


@dataclass
class ActivationCheckpointingConfig:
    policy: str = plain("none")  # none | full | every_k | sqrt | selective (which blocks recompute)
    every: int = plain(2)  # for every_k: recompute blocks 0, k, 2k, ... (k = every, >= 1; 1 = all blocks)


# A policy turns (config, n_layer) into one recompute mode per block.
PlanFn = Callable[[ActivationCheckpointingConfig, int], list[str]]
POLICIES: Registry[PlanFn] = Registry("activation_checkpointing.policy")


@POLICIES.register("none")
def keep_all(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """Nothing recomputed. Memory L*A."""
    return ["none"] * n_layer


@POLICIES.register("full")
def recompute_all(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """Every block "full". Memory L*I + A, the least possible per-block, at ~+33% compute."""
    return ["full"] * n_layer


@POLICIES.register("every_k")
def every_k(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """Block i is "full" when ``i % every == 0`` (blocks 0, k, 2k, ...), the rest "none".

    every=1 is the same as full; every=2 recomputes half the blocks.
    """
    return ["full" if i % cfg.every == 0 else "none" for i in range(n_layer)]


@POLICIES.register("sqrt")
def sqrt(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """k = max(1, round(sqrt(L))); the last block and every k-th one counting back from it are "none".

    Those are the blocks with ``(L - 1 - i) % k == 0``; all others are "full". That keeps ceil(L/k) ~
    sqrt(L) blocks' full activations, so memory ~ (sqrt(L) + 1)*A + L*I: O(sqrt(L)) in the dominant A
    term, as in Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost"), while recomputing
    L - ceil(L/k) blocks. Leaving the *last* block un-recomputed matters: backward starts there, so its
    A is freed before the first recompute buffer is needed.

    Chen et al. checkpoint segments of ~sqrt(L) layers and keep only L/k segment inputs; with per-block
    checkpointing every block's input stays alive anyway and I << A, so "full" already uses less memory
    than the segment scheme. sqrt is the compute/memory middle ground between none and full.
    """
    k = max(1, round(math.sqrt(n_layer)))
    return ["none" if (n_layer - 1 - i) % k == 0 else "full" for i in range(n_layer)]


@POLICIES.register("selective")
def selective(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """Every block "selective". Memory ~0.7*L*A + A at almost no extra compute."""
    return ["selective"] * n_layer


def validate(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = POLICIES.problems(str(cfg.policy))
    if not isinstance(cfg.every, int) or isinstance(cfg.every, bool) or cfg.every < 1:
        problems.append(f"activation_checkpointing.every: must be an integer >= 1, got {cfg.every!r}")
    if n_layer < 1:
        problems.append(f"model.n_layer: need at least one block to plan checkpointing for, got {n_layer}")
    return problems


def plan(cfg: ActivationCheckpointingConfig, n_layer: int) -> list[str]:
    """Per-block recompute modes ("none" | "full" | "selective") for the configured policy."""
    problems = validate(cfg, n_layer)
    if problems:
        raise ValueError("; ".join(problems))
    return POLICIES.get(cfg.policy)(cfg, n_layer)


def apply(model: nn.Module, cfg: ActivationCheckpointingConfig) -> list[str]:
    """Set ``model.recompute`` from the policy and return the plan."""
    modes = plan(cfg, len(model.h))
    model.recompute = modes
    return modes
