"""A minimal GPT-2 training step in plain PyTorch, with no greenrun code: the reference row of bench_gpu.py.

The same block maths as greenrun.train.model (pre-LayerNorm, tanh GELU, SDPA causal attention, tied head,
vocabulary padded to 50304), written the way a hand-written nanoGPT-style loop is: full logits and
F.cross_entropy over the padded width, bf16 autocast, torch.compile, fused AdamW with weight decay on
matrices, gradient clipping at 1.0, batches from a pinned host buffer copied without blocking.
Optionally Liger's fused linear cross-entropy replaces the head matmul and the loss (`loss="liger"`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, PADDED = 50257, 50304


class Block(nn.Module):
    def __init__(self, C: int, H: int, bias: bool):
        super().__init__()
        self.H = H
        self.ln_1 = nn.LayerNorm(C, bias=bias)
        self.c_attn = nn.Linear(C, 3 * C, bias=bias)
        self.a_proj = nn.Linear(C, C, bias=bias)
        self.ln_2 = nn.LayerNorm(C, bias=bias)
        self.c_fc = nn.Linear(C, 4 * C, bias=bias)
        self.m_proj = nn.Linear(4 * C, C, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.a_proj(y)
        return x + self.m_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(
        self, L: int = 12, H: int = 12, C: int = 768, T: int = 1024, bias: bool = True, loss: str = "plain"
    ):
        super().__init__()
        self.wte = nn.Embedding(PADDED, C)
        self.wpe = nn.Embedding(T, C)
        self.h = nn.ModuleList(Block(C, H, bias) for _ in range(L))
        self.ln_f = nn.LayerNorm(C, bias=bias)
        self.loss = loss
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        if loss == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.flce = LigerFusedLinearCrossEntropyLoss()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if self.loss == "liger":
            return self.flce(self.wte.weight, x.reshape(-1, x.shape[-1]), targets.reshape(-1))
        logits = F.linear(x, self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, PADDED), targets.reshape(-1))


def make_step(
    micro: int, accum: int, seq: int = 1024, bias: bool = True, loss: str = "plain", compile: bool = True
):
    """A zero-argument function running one optimizer step; and the model (for counting)."""
    torch.manual_seed(0)
    net = RefGPT(T=seq, bias=bias, loss=loss).cuda()
    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)
    run = torch.compile(net) if compile else net
    gen = torch.Generator().manual_seed(0)
    # A rotating set of pinned host batches, as a memmap loader hands them over.
    host = [torch.randint(0, VOCAB, (micro, seq + 1), generator=gen).pin_memory() for _ in range(8)]
    state = {"i": 0}

    def step() -> None:
        for _ in range(accum):
            rows = host[state["i"] % len(host)].cuda(non_blocking=True)
            state["i"] += 1
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = run(rows[:, :-1], rows[:, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, net
