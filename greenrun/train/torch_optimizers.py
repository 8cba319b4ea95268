"""The two optimizers greenrun writes itself, as torch.optim.Optimizer subclasses: Lion, and Muon for the
matrices with AdamW for the rest presented as one optimizer (one state_dict, one set of param groups).

greenrun.train.optimizer registers the options that build them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

# --- Lion -----------------------------------------------------------------------------------------------


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): each coordinate steps by lr
    times the sign of a blend of momentum and gradient, with decoupled weight decay; one fp32 momentum per
    parameter, no step counter (there is no bias correction)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: need lr > 0, weight_decay >= 0, betas in [0, 1); got {lr}, {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            moments = [self.state[p]["exp_avg"] for p in params]
            beta1, beta2 = group["betas"]
            lr, decay = group["lr"], group["weight_decay"]
            if decay:
                torch._foreach_mul_(params, 1.0 - lr * decay)
            update = torch._foreach_lerp(moments, grads, 1.0 - beta1)  # beta1 m + (1 - beta1) g
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_lerp_(moments, grads, 1.0 - beta2)  # the momentum learns from g after the update
        return loss


def _closure_loss(closure: Callable[[], float] | None) -> float | None:
    """torch.optim's step(closure) contract: re-evaluate the loss with gradients on, before the update."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# --- Muon for the matrices, AdamW for the rest, as one optimizer -----------------------------------------


class _States(Mapping):
    """The parts' per-parameter state as one read-only mapping, looked up live: a part's load_state_dict
    replaces its state dict, so a copy taken once would go stale."""

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer]) -> None:
        self._parts = parts

    def __getitem__(self, p: torch.Tensor) -> dict:
        for part in self._parts.values():
            if p in part.state:
                return part.state[p]
        raise KeyError("not a parameter with state in this optimizer")

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self._parts.values():
            yield from part.state

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._parts.values())


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for the rest, as the one optimizer the trainer steps, zeroes,
    scales and checkpoints. param_groups holds the parts' own group dicts, so the trainer's group["lr"] reaches
    them and GradScaler.unscale_ (which walks param_groups) unscales every gradient; state is a live view of
    both parts' states; state_dict() is {"muon": ..., "adamw": ...}, the parts' own."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.parts = {"muon": muon, "adamw": adamw}
        super().__init__(self._groups(), defaults={})  # adopts the parts' group dicts as they are
        self.state = _States(self.parts)

    def _groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _closure_loss(closure)
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"optimizer state has parts {sorted(state_dict)}, expected {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
        self.param_groups = self._groups()  # loading gave each part new group dicts
