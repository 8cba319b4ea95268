"""Analytic peak training memory per device, so a run can be sized before it is launched.

Notation: B = micro-batch, T = sequence length, C = n_embd, H = n_head, L = n_layer, V = vocab_size,
Vp = padded vocab, N = unique parameter count (tied head counted once), a = bytes per activation
element (the precision option's act_bytes: 4 in fp32, 2 under fp16/bf16/fp8 autocast), r = 4 = bytes
per residual-stream element (parameters stay fp32 under autocast, so the embeddings and every residual
add stay fp32 too).

Weights, gradients, optimizer (parameters are fp32 master copies in every precision):
    params          = 4 N, plus 2 bytes per matmul weight element (12 L C^2 + Vp C) under autocast,
                      because autocast caches one half-precision copy of each weight for the step
    grads           = 4 N
    optimizer_state = what the optimizer option keeps for this model's parameters (its state_bytes, asked
                      of a meta-device model: adamw 8 N, two fp32 moments, + 4 bytes of step counter per tensor)

Activations, bytes per token, counted from what autograd saves in ``greenrun.train.model.Block``:
    "none" block      2 C r   LayerNorm inputs (ln_1: the block input; ln_2: after the attention add)
                    + 14 C a  ln_1 out (C), qkv (3C: q, k, v are views of it), attention out (C, also
                              the c_proj input, same storage), ln_2 out (C), c_fc out (4C) = GELU
                              input, GELU out (4C) = c_proj input
                    + 16      mean and rstd of both LayerNorms (fp32)
                    + 4 H     attention logsumexp (fp32)
                    + 2 C     dropout masks, only when dropout > 0
    "full" block      C r     its input only
    "selective"       C r + 10 C a + 4 H: input, plus every matmul/attention output (qkv 3C, attention
                              out C + lse, attn c_proj out C, c_fc out 4C, mlp c_proj out C)
    model ends        C r + 8 (ln_f input and stats) + 8 (token ids), + C for the embedding dropout
                      mask when dropout > 0, and 8 T per sequence for the position ids
    activations = B T (per-block sum + model ends)

Loss path, held from forward to backward:
    loss_chunk == 0:  B T (C a + 4 Vp + 8): head input, the fp32 log-softmax over the padded width
                      (padding masked to -inf) the loss saves, and the targets; no logits are returned
    loss_chunk > 0:   4 B T C + 4 Vp C: the finished gradients w.r.t. the hidden states and head weight

Transient, the largest short-lived buffer (only one exists at a time, so the max is taken):
    recompute buffer = one "none" block's activations, while a recomputed block runs its backward
    loss_chunk == 0: B T Vp (8 + a): fp32 gradients of the log-softmax and logits, plus the
                     activation-dtype gradient of the logits, during the loss backward
    loss_chunk > 0:  loss_chunk Vp (4 + a') + Vp C a: one fp32 chunk of logits (a' = a under autocast,
                     for the half-precision matmul output; 0 in fp32) and one head-gradient partial

total = params + grads + optimizer_state + activations + logits + transient. Allocator fragmentation,
the CUDA context (~0.5 GiB) and communication buffers are not included. Calibrated on CPU against the
bytes autograd actually saves (tests/test_memory.py): within 1% for every recompute mode.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, fields
from typing import TypeVar

import torch

from greenrun.core.registry import Registry
from greenrun.train.model import GPT, ModelConfig, count_params, padded_vocab
from greenrun.train.optimizer import OPTIMIZERS, OptimizerOption
from greenrun.train.precision import PRECISIONS

Option = TypeVar("Option")
SHARDING = ("none", "optimizer", "full")
GiB = 2**30


@dataclass
class MemoryEstimate:
    params: int  # bytes: fp32 master weights (+ autocast's half-precision weight copies)
    grads: int  # bytes: fp32 gradients
    optimizer_state: int  # bytes: what the optimizer keeps between steps (AdamW: two moments)
    activations: int  # bytes: what the blocks save from forward until backward
    logits: int  # bytes: what the lm head + cross-entropy save from forward until backward
    transient: int  # bytes: largest short-lived buffer in backward (recompute or loss gradients)
    total: int  # bytes: sum of all of the above, the estimated peak per device

    def table(self) -> list[tuple[str, str]]:
        """(name, "x.xx GiB") rows in field order, total last."""
        return [(f.name, _gib(getattr(self, f.name))) for f in fields(self)]


def _gib(nbytes: int) -> str:
    x = nbytes / GiB
    if x >= 100:
        return f"{x:,.0f} GiB"
    if x >= 1:
        return f"{x:.2f} GiB"
    return f"{x:.3g} GiB"


def block_bytes_per_token(model_cfg: ModelConfig, mode: str, precision: str) -> int:
    """Bytes one block saves per token under a recompute mode ("none" | "full" | "selective")."""
    C, H = model_cfg.n_embd, model_cfg.n_head
    a, r = _act_bytes(precision), 4
    if mode == "none":
        return 2 * C * r + 14 * C * a + 16 + 4 * H + (2 * C if model_cfg.dropout > 0 else 0)
    if mode == "full":
        return C * r
    if mode == "selective":
        return C * r + 10 * C * a + 4 * H
    raise ValueError(f"unknown recompute mode {mode!r}; expected none | full | selective")


def _act_bytes(precision: str) -> int:
    return _option(PRECISIONS, precision).act_bytes


def _option(registry: Registry[Option], name: str) -> Option:
    # A bad argument, not a bad lookup: ValueError, worded like the config validation's message.
    problems = registry.problems(name)
    if problems:
        raise ValueError(problems[0])
    return registry.get(name)


@functools.lru_cache(maxsize=32)
def _optimizer_state(option: OptimizerOption, model_fields: tuple) -> int:
    # Parameter shapes and module types are all state_bytes reads: a meta-device model has them, costs no
    # memory, and is cached because fit.py asks for the same model once per lever.
    with torch.device("meta"):
        model = GPT(ModelConfig(*model_fields))
    return option.state_bytes(model)


def estimate(
    model_cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str,
    recompute: list[str],
    optimizer: str = "adamw",
    world_size: int = 1,
    loss_chunk: int | None = None,
    shard: str = "none",
) -> MemoryEstimate:
    """Estimated peak training memory per device, in bytes (formulas in the module docstring).

    ``recompute`` is the per-block plan from ``activation_checkpointing.plan``. ``loss_chunk`` None
    means ``model_cfg.loss_chunk``. ``shard`` says what ``world_size`` divides: "none" (plain DDP,
    every device holds everything), "optimizer" (ZeRO-1: optimizer state), "full" (FSDP / ZeRO-3:
    params, grads and optimizer state; the one-block all-gather buffer is ignored).
    """
    if len(recompute) != model_cfg.n_layer:
        raise ValueError(f"recompute plan has {len(recompute)} entries for n_layer={model_cfg.n_layer}")
    if shard not in SHARDING:
        raise ValueError(f"unknown shard {shard!r}; expected one of {SHARDING}")
    if world_size < 1 or micro_batch < 1 or seq_len < 1:
        raise ValueError("world_size, micro_batch and seq_len must all be >= 1")
    chunk = model_cfg.loss_chunk if loss_chunk is None else loss_chunk
    a = _act_bytes(precision)
    C, L, Vp = model_cfg.n_embd, model_cfg.n_layer, padded_vocab(model_cfg)
    tokens = micro_batch * seq_len

    n = count_params(model_cfg, non_embedding=False)
    params = 4 * n + (2 * (12 * L * C * C + Vp * C) if a < 4 else 0)
    grads = 4 * n
    optimizer_state = _optimizer_state(_option(OPTIMIZERS, optimizer), dataclasses.astuple(model_cfg))
    if shard in ("optimizer", "full"):
        optimizer_state //= world_size
    if shard == "full":
        params, grads = params // world_size, grads // world_size

    ends = 4 * C + 8 + 8 + (C if model_cfg.dropout > 0 else 0)
    per_token = ends + sum(block_bytes_per_token(model_cfg, mode, precision) for mode in recompute)
    activations = tokens * per_token + 8 * seq_len
    recompute_buffer = tokens * block_bytes_per_token(model_cfg, "none", precision)
    if all(mode == "none" for mode in recompute):
        recompute_buffer = 0

    if chunk > 0:
        logits = 4 * tokens * C + 4 * Vp * C
        chunk = min(chunk, tokens)
        loss_transient = chunk * Vp * (4 + (a if a < 4 else 0)) + Vp * C * a
    else:
        logits = tokens * (C * a + 4 * Vp + 8)
        loss_transient = tokens * Vp * (8 + a)
    transient = max(recompute_buffer, loss_transient)

    total = params + grads + optimizer_state + activations + logits + transient
    return MemoryEstimate(params, grads, optimizer_state, activations, logits, transient, total)
