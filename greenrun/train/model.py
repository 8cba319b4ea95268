"""A GPT-2-style decoder-only transformer.

Reads top to bottom: config and presets (conf/model/*.yaml), the fused chunked loss, the transformer
pieces, the GPT module itself, and finally the helpers (parameter and FLOP counts, sampling) that the
launcher uses.
Parameter names follow GPT-2 (``wte``, ``wpe``, ``h.N.attn.c_attn`` ...) so checkpoints map 1:1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from greenrun.core import shipped
from greenrun.core.fields import maths

# Embedding rows are padded to a multiple of this so the lm-head matmul hits fast GPU tile sizes.
VOCAB_MULTIPLE = 64


@dataclass
class ModelConfig:
    name: str = maths("tiny")  # preset name: tiny | gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    n_layer: int = maths(4)  # number of transformer blocks, >= 1
    n_head: int = maths(4)  # attention heads per block; must divide n_embd
    n_embd: int = maths(128)  # residual stream width (hidden size), channels
    seq_len: int = maths(128)  # context length, tokens
    vocab_size: int = maths(4096)  # tokenizer vocabulary; embedding rows padded up to a multiple of 64
    dropout: float = maths(0.0)  # dropout probability in [0, 1); 0 for pretraining
    bias: bool = maths(True)  # use biases in Linear and LayerNorm layers, as GPT-2 does
    loss_chunk: int = maths(0)  # tokens per chunk of the fused linear + cross-entropy; 0 = plain loss
    # learn = nanoGPT's and llm.c's maths, whose never-seen padding classes learn to be small; eval always masks.
    pad_logits: str = maths("mask")  # padding columns in the training loss: mask (-inf) | learn (softmax)

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self)


def padded_vocab(cfg: ModelConfig) -> int:
    """Vocabulary size rounded up to a multiple of 64 (the number of embedding rows)."""
    return -(-cfg.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of conf/model/<name>.yaml (the only place presets live), with field overrides."""
    return ModelConfig(**{"name": name, **shipped.load_option("model", name), **overrides})


# --- Fused linear + cross-entropy ----------------------------------------------------------------


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` without ever holding all the logits.

    The full [tokens, vocab] fp32 logits of a GPT-2 batch are often bigger than every activation
    of the network together. Instead we walk over token chunks, and because the gradient of
    softmax-cross-entropy is just ``softmax - onehot``, each chunk's gradients w.r.t. the hidden
    states and the head weight can be finished in the forward pass. Backward then only rescales
    them, so the only saved state is one hidden-sized and one weight-sized tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk: int):
        # vocab_size = weight rows means no column is masked (pad_logits=learn).
        n_valid = (targets != -1).sum().clamp(min=1)  # clamp: an all-ignored batch gives loss 0, not NaN
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            # Only this chunk's logits are upcast, which is what bounds memory at chunk * vocab * 4 bytes.
            logits = (h @ weight.t()).float()
            if weight.shape[0] > vocab_size:
                logits[:, vocab_size:] = float("-inf")  # padding rows must never get probability
            lse = torch.logsumexp(logits, dim=1)
            valid = t != -1
            safe_t = t.clamp(min=0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += ((lse - target_logit) * valid).sum()
            # Turn the logits into d(loss)/d(logits) in place rather than allocating a second buffer.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            grad *= (valid / n_valid)[:, None]
            grad = grad.to(h.dtype)
            grad_hidden[start : start + chunk] = grad @ weight.to(h.dtype)
            grad_weight += grad.t() @ h  # in-place add upcasts a half-precision partial
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden[N, C] @ weight[V, C].T`` vs ``targets[N]`` (-1 = ignored)."""
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk)


# --- Transformer blocks --------------------------------------------------------------------------


def _maybe_dropout(p: float) -> nn.Module:
    # An identity at p=0 keeps dropout out of the autograd graph entirely (no saved masks).
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = _maybe_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = _maybe_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream itself is never normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# --- Activation checkpointing --------------------------------------------------------------------

# Matmul-like ops are the expensive part of a block, and their outputs are what selective
# checkpointing keeps; norms, GELU and adds are cheap to redo. Some ops only exist in some builds.
_SAVE_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)
SELECTIVE_SAVE_OPS = frozenset(
    getattr(torch.ops.aten, name).default for name in _SAVE_OP_NAMES if hasattr(torch.ops.aten, name)
)
RECOMPUTE_MODES = ("none", "full", "selective")


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_block(block: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Run one block under a recompute mode: "none" | "full" | "selective"."""
    if mode == "none":
        return block(x)
    if mode == "full":
        return checkpoint(block, x, use_reentrant=False)
    if mode == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        return checkpoint(block, x, use_reentrant=False, context_fn=context_fn)
    raise ValueError(f"unknown recompute mode {mode!r}; expected one of {RECOMPUTE_MODES}")


# --- The model -----------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(padded_vocab(cfg), cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.drop = _maybe_dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        # One entry per block; activation_checkpointing.apply() rewrites it.
        self.recompute: list[str] = ["none"] * cfg.n_layer
        # A linear over wte.weight itself, set only by precisions that convert the head (fp8.lm_head).
        self.lm_head: nn.Module | None = None
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # since each block adds two of them and the stream's variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        # The output head is tied to the token embedding (one tensor, saved once in checkpoints).
        return self.wte.weight

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (logits, loss).

        - no targets: logits of the last position only, [B, 1, vocab_size], loss None;
        - targets: logits None and the mean cross-entropy (targets equal to -1 are ignored).
        A forward with targets never hands its logits back: a caller holding them would make autograd
        keep, and backward allocate and zero-fill, a [B, T, padded_vocab] gradient nobody reads
        (1.65 GB at micro-batch 16 of GPT-2).
        """
        cfg = self.cfg
        B, T = idx.shape
        if cfg.seq_len < T:
            raise ValueError(f"sequence of {T} tokens is longer than seq_len={cfg.seq_len}")
        if len(self.recompute) != len(self.h):
            raise ValueError(f"recompute has {len(self.recompute)} entries for {len(self.h)} blocks")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        # Recomputation only pays off when a backward pass will follow.
        checkpointing = self.training and torch.is_grad_enabled()
        for block, mode in zip(self.h, self.recompute, strict=True):
            x = run_block(block, x, mode if checkpointing else "none")
        x = self.ln_f(x)

        if targets is None:
            logits = F.linear(x[:, [-1], :], self.wte.weight)[..., : cfg.vocab_size]
            return logits, None
        # learn: the softmax runs over every padded column; evaluation still masks them.
        classes = self.wte.weight.shape[0] if cfg.pad_logits == "learn" and self.training else cfg.vocab_size
        if cfg.loss_chunk > 0:
            loss = chunked_cross_entropy(
                x.reshape(B * T, -1), self.wte.weight, targets.reshape(-1), classes, cfg.loss_chunk
            )
            return None, loss
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.wte.weight)
        return None, padded_cross_entropy(logits, targets, classes)


def padded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean fp32 cross-entropy of logits [..., padded_vocab] over the first `vocab_size` classes.

    The padding columns are masked to -inf rather than sliced off: a slice makes the softmax run over an
    odd width (50257 for GPT-2) and backward rebuild the full-width gradient in an extra kernel, while a
    mask is one more pointwise op that torch.compile fuses into the loss's own kernels.
    """
    logits = logits.float()
    padded = logits.shape[-1]
    if padded > vocab_size:
        logits = logits.masked_fill(torch.arange(padded, device=logits.device) >= vocab_size, float("-inf"))
    return F.cross_entropy(logits.reshape(-1, padded), targets.reshape(-1), ignore_index=-1)


# --- Counting and sampling -----------------------------------------------------------------------


def num_params(model: nn.Module, non_embedding: bool = True) -> int:
    """Unique parameter count (the tied head is counted once, as the embedding).

    With ``non_embedding`` the token and position embeddings are left out, which is the N that
    scaling laws use.
    """
    n = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates tied tensors
    if non_embedding:
        n -= model.wte.weight.numel() + model.wpe.weight.numel()
    return n


def count_params(cfg: ModelConfig, non_embedding: bool = True) -> int:
    """num_params() computed from the config alone, without building the model."""
    C, b = cfg.n_embd, int(cfg.bias)
    ln = C * (1 + b)
    attn = C * 3 * C + b * 3 * C + C * C + b * C
    mlp = C * 4 * C + b * 4 * C + 4 * C * C + b * C
    n = cfg.n_layer * (2 * ln + attn + mlp) + ln
    if not non_embedding:
        n += padded_vocab(cfg) * C + cfg.seq_len * C
    return n


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward): ``6 * N + 12 * L * H * Q * T``.

    N is the non-embedding parameter count plus the lm head (padded_vocab * n_embd, since the head
    matmul runs over the padded rows), L = n_layer, H = n_head, Q = n_embd / n_head (head size) and
    T = seq_len. The second term is the attention score and value matmuls, which have no
    parameters. For GPT-2 124M at T=1024 this is about 855e6.
    """
    n = count_params(cfg, non_embedding=True) + padded_vocab(cfg) * cfg.n_embd
    head_dim = cfg.n_embd // cfg.n_head
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * head_dim * cfg.seq_len


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``idx`` [B, T]; returns [B, T + max_new_tokens].

    temperature <= 0 means greedy decoding; top_k None or 0 samples from the whole vocabulary.
    The context is cropped to the last seq_len tokens, so prompts of any length work.
    """
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.cfg.seq_len :])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
    finally:
        model.train(was_training)
    return idx
