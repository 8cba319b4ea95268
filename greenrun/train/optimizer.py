"""Optimizers: each option builds itself and says how much state it keeps, so memory estimates ask it.

A new optimizer is one class registered in OPTIMIZERS here and one conf/optimizer/<name>.yaml. Reads top to
bottom: the config, the option Protocol, which parameters get what, the options (Lion and Muon + AdamW as one
optimizer live in torch_optimizers), then what the trainer, memory model and validation call. A param
group may carry "lr_scale": the trainer sets its lr to the schedule's lr x group.get("lr_scale", 1.0).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from greenrun.core import checks
from greenrun.core.fields import maths
from greenrun.core.registry import Registry
from greenrun.train import fp8
from greenrun.train.torch_optimizers import Lion, MuonWithAdamW


@dataclass
class OptimizerConfig:
    name: str = maths("adamw")  # adamw | adafactor | adamw8bit (CUDA, torchao) | lion | muon (+ AdamW)
    lr: float = maths(2.0e-3)  # peak learning rate after warmup (adafactor: cap on its relative step)
    beta1: float = maths(0.9)  # first-moment decay (lion: gradient weight in the update); adafactor: unused
    beta2: float = maths(0.95)  # second-moment decay (lion: momentum decay); adafactor: unused
    eps: float = maths(1.0e-8)  # denominator epsilon (adafactor: floor of the variance estimate's root)
    weight_decay: float = maths(0.1)  # decoupled weight decay, on the linear layers' weights only
    fused: bool | None = maths(None)  # fused CUDA AdamW kernel; None = on when the parameters live on CUDA
    beta2_decay: float = maths(-0.8)  # adafactor: second-moment decay at step t is 1 - t^beta2_decay, <= 0
    clip_threshold: float = maths(1.0)  # adafactor: an update's RMS is clipped to this, >= 1
    min_rms: float = maths(1.0e-3)  # adafactor: floor of a parameter's RMS where it scales the step
    muon_lr_scale: float = maths(1.0)  # muon: hidden matrices' lr as a multiple of lr (AdamW's part: 1)
    muon_momentum: float = maths(0.95)  # muon: momentum of the hidden matrices' (Nesterov) updates
    muon_ns_steps: int = maths(5)  # muon: Newton-Schulz iterations that orthogonalise an update, 1-99
    muon_adjust_lr: str = maths("match_rms_adamw")  # muon: per-shape lr factor: match_rms_adamw | original


MUON_ADJUST_LR = ("match_rms_adamw", "original")  # torch.optim.Muon's adjust_lr_fn values
STEP_BYTES = 4  # the fp32 step counter AdamW and Adafactor keep per parameter tensor
BLOCK = 256  # torchao AdamW8bit's default: values per quantization block, each block with one fp32 scale
QMAP_BYTES = 256 * 4  # torchao: one fp32 code table of 256 entries per 8-bit moment tensor
QUANTIZE_MIN = 4096  # torchao quantizes a moment only from this many values (smaller ones stay fp32)


class OptimizerOption(Protocol):
    """One optimizer option. Subclass it to inherit the defaults of device_problems and cpu_stand_in."""

    cpu_stand_in: str | None = None  # the option `greenrun smoke` builds instead on a CPU (None: itself)

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over `model`'s parameters."""
        ...

    def state_bytes(self, model: nn.Module) -> int:
        """Bytes of state kept between steps for `model`'s fp32 parameters, every tensor counted (a model on
        the meta device will do: only parameter shapes and module types are read)."""
        ...

    def device_problems(self, device: torch.device) -> list[str]:
        """What stops this option on `device`, in words a user can act on; [] if nothing does."""
        return []


OPTIMIZERS: Registry[OptimizerOption] = Registry("optimizer.name")


# --- which parameters get what ------------------------------------------------------------------------


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(matrices, the rest): the 2-D weights of the linear layers, and embeddings (the tied head is the token
    embedding), biases and norm gains. Each parameter once, in model order."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, rest = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (matrices if p.dim() == 2 and id(p) not in embeddings else rest).append(p)
    return matrices, rest


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the linear layers' weights; never embeddings (whose rows only move when their token is seen, so
    decay would shrink rare tokens towards zero), biases or norm gains."""
    matrices, rest = split(model)
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _fused(cfg: OptimizerConfig, model: nn.Module) -> bool:
    return next(model.parameters()).is_cuda if cfg.fused is None else cfg.fused


def _adamw_bytes(params: Iterable[nn.Parameter]) -> int:
    return sum(8 * p.numel() + STEP_BYTES for p in params)  # two fp32 moments and a step counter


def _torch_has(name: str, since: str) -> list[str]:
    # greenrun accepts torch >= 2.4, and torch.optim gained Adafactor in 2.5 and Muon in 2.9.
    if hasattr(torch.optim, name):
        return []
    return [
        f"optimizer={name.lower()} needs torch.optim.{name}, new in torch {since}; this is {torch.__version__}"
    ]


# --- the options ----------------------------------------------------------------------------------------


class AdamW(OptimizerOption):
    """AdamW with weight decay on the linear layers' weights only; the fused kernel on CUDA unless told not."""

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=_fused(cfg, model),
        )

    def state_bytes(self, model: nn.Module) -> int:
        return _adamw_bytes(_params(model))


class Adafactor(OptimizerOption):
    """torch.optim.Adafactor: no first moment, and a matrix's second moment kept as one row and one column
    factor, so its state is O(rows + columns) instead of O(rows x columns)."""

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adafactor(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            beta2_decay=cfg.beta2_decay,
            eps=(cfg.eps, cfg.min_rms),
            d=cfg.clip_threshold,
        )

    def device_problems(self, device: torch.device) -> list[str]:
        return _torch_has("Adafactor", "2.5")

    def state_bytes(self, model: nn.Module) -> int:
        total = 0
        for p in _params(model):
            n = p.numel()
            # A row factor (the last dimension averaged out) and a column factor (the one before); vectors whole.
            total += 4 * (n // p.shape[-1] + n // p.shape[-2] if p.dim() > 1 else n) + STEP_BYTES
        return total


class AdamW8bit(OptimizerOption):
    """torchao's AdamW8bit: both moments as 8-bit codes with one fp32 scale per block of values, on CUDA (on a
    CPU torchao's torch.compile'd update is a C++ build per shape, for no memory worth saving)."""

    cpu_stand_in = "adamw"

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        problems = self.device_problems(next(model.parameters()).device)
        if problems:
            raise RuntimeError(problems[0])
        return _float_lr_adamw8bit()(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            block_size=BLOCK,
        )

    def state_bytes(self, model: nn.Module) -> int:
        return sum(2 * _moment_8bit(p.numel()) + STEP_BYTES for p in _params(model))

    def device_problems(self, device: torch.device) -> list[str]:
        if device.type != "cuda":
            return [
                f"optimizer=adamw8bit runs torchao's 8-bit AdamW on CUDA GPUs only, and this run is on {device}; "
                "use optimizer=adafactor (factored second moments: also little state) or optimizer=adamw"
            ]
        if importlib.util.find_spec("torchao") is None:
            return [f"optimizer=adamw8bit needs torchao, which is not installed: {fp8.torchao_hint()}"]
        return []


def _moment_8bit(n: int) -> int:
    """Bytes of one torchao 8-bit moment of `n` values: codes, block scales, code table; fp32 when too small
    or ragged for the blocks."""
    return 4 * n if n < QUANTIZE_MIN or n % BLOCK else n + 4 * (n // BLOCK) + QMAP_BYTES


def _float_lr_adamw8bit() -> type[torch.optim.Optimizer]:
    """torchao's AdamW8bit, taking the float group["lr"] the trainer writes each step (torchao wants a tensor,
    so its compiled update is not recompiled for every new lr)."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    class FloatLrAdamW8bit(TorchaoAdamW8bit):
        def step(self, closure: Callable[[], float] | None = None) -> float | None:
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            return super().step(closure)

    return FloatLrAdamW8bit


class LionOption(OptimizerOption):
    """Lion (above), weight decay on the linear layers' weights only."""

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(model, cfg.weight_decay)
        return Lion(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def state_bytes(self, model: nn.Module) -> int:
        return sum(4 * p.numel() for p in _params(model))  # one fp32 momentum


class Muon(OptimizerOption):
    """torch.optim.Muon on the linear layers' weights (decayed), AdamW on embeddings, head, biases and norm
    gains (not decayed); the matrices run at muon_lr_scale x the schedule's lr."""

    def build(self, cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
        matrices, rest = split(model)
        scale = cfg.muon_lr_scale
        muon = torch.optim.Muon(
            [{"params": matrices, "lr_scale": scale}],
            lr=cfg.lr * scale,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
            adjust_lr_fn=cfg.muon_adjust_lr,
        )
        adamw = torch.optim.AdamW(
            [{"params": rest, "lr_scale": 1.0}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=0.0,
            fused=_fused(cfg, model),
        )
        return MuonWithAdamW(muon, adamw)

    def device_problems(self, device: torch.device) -> list[str]:
        return _torch_has("Muon", "2.9")

    def state_bytes(self, model: nn.Module) -> int:
        matrices, rest = split(model)
        return sum(4 * p.numel() for p in matrices) + _adamw_bytes(rest)  # Muon: one fp32 momentum


OPTIMIZERS.add("adamw", AdamW())
OPTIMIZERS.add("adafactor", Adafactor())
OPTIMIZERS.add("adamw8bit", AdamW8bit())
OPTIMIZERS.add("lion", LionOption())
OPTIMIZERS.add("muon", Muon())


# --- what the trainer, the memory model and the validation call -----------------------------------------


def get(name: str) -> OptimizerOption:
    """The option called `name`; KeyError naming the closest valid ones otherwise."""
    return OPTIMIZERS.get(name)


def build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over `model`; KeyError naming the closest options for an unknown name."""
    return get(cfg.name).build(cfg, model)


def device_problems(cfg: OptimizerConfig, device: torch.device) -> list[str]:
    """What makes the configured optimizer impossible on `device`; [] for an unknown name (validate says it)."""
    if cfg.name not in OPTIMIZERS:
        return []
    return get(cfg.name).device_problems(device)


# (key, test, what it must be): ranges the optimizers themselves would reject later, or silently misuse.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("lr", lambda x: x > 0, "> 0"),
    ("beta1", lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    ("beta2", lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    ("eps", lambda x: x >= 0, ">= 0"),
    ("weight_decay", lambda x: x >= 0, ">= 0"),
    ("beta2_decay", lambda x: x <= 0, "<= 0"),
    ("clip_threshold", lambda x: x >= 1, ">= 1"),
    ("min_rms", lambda x: x >= 0, ">= 0"),
    ("muon_lr_scale", lambda x: x > 0, "> 0"),
    ("muon_momentum", lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    ("muon_ns_steps", lambda x: 1 <= x < 100, "in 1..99"),
]


def validate(cfg: OptimizerConfig) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = OPTIMIZERS.problems(str(cfg.name))
    for key, ok, want in _RANGES:
        if not ok(getattr(cfg, key)):
            problems.append(f"optimizer.{key}: must be {want}, got {getattr(cfg, key)}")
    problems += checks.choice("optimizer.muon_adjust_lr", str(cfg.muon_adjust_lr), MUON_ADJUST_LR)
    return problems
