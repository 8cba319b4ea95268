"""Float8 training of the wide linear layers, through torchao.

fp8 matmuls run at twice bf16's tensor-core rate on Ada and Hopper GPUs, but every fp8 linear also
has to scale and cast its input, weight and output gradient each step. That overhead is paid per
element while the saving grows with the matmul's width, so narrow layers get slower. Measured on an
H200 for compiled MLP stacks, fp8 over bf16: 0.78x at width 768, 1.01x at 1280, 1.07x at 1600,
1.10x at 2048 and 1.43x at 4096. Hence only nn.Linear layers at least ``min_width`` wide in both
dimensions are converted; the rest, and everything that is not a matmul, stay in bf16 autocast.

Reads top to bottom: the config and its validation, the pure layer filter and plan (no torchao
needed, so they run and are tested on CPU), the conversion itself, then what a device must have.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn as nn

from greenrun.core import checks
from greenrun.core.fields import maths

# torchao's Float8LinearRecipeName values. rowwise_with_gw_hp keeps the weight-gradient matmul in
# high precision: the most accurate and the slowest of the three.
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")

# fp8 tensor cores first appear in compute capability 8.9 (Ada); Hopper is 9.0.
MIN_CAPABILITY = (8, 9)

# torch._scaled_mm, which every fp8 linear ends in, needs both matmul dimensions to be multiples of 16.
FP8_DIM_MULTIPLE = 16

HEAD = "lm_head"  # the name of the tied output head's linear when fp8.lm_head adds one


@dataclass
class Fp8Config:
    recipe: str = maths("tensorwise")  # tensorwise (per-tensor scale, fastest) | rowwise | rowwise_with_gw_hp
    min_width: int = maths(2048)  # convert an nn.Linear only if in and out features are both >= this (>= 16)
    lm_head: bool = maths(False)  # also run the tied output head (n_embd x padded vocab) as an fp8 matmul


def validate(cfg: Fp8Config) -> list[str]:
    """Problems with the config as human-readable strings; an empty list means it is usable."""
    problems = checks.choice("fp8.recipe", str(cfg.recipe), RECIPES)
    if (
        not isinstance(cfg.min_width, int)
        or isinstance(cfg.min_width, bool)
        or cfg.min_width < FP8_DIM_MULTIPLE
    ):
        problems.append(
            f"fp8.min_width: must be an integer >= {FP8_DIM_MULTIPLE} (fp8 matmuls need dimensions that are "
            f"multiples of {FP8_DIM_MULTIPLE}, and narrow layers run slower in fp8), got {cfg.min_width!r}"
        )
    return problems


# --- Which layers ---------------------------------------------------------------------------------


def layer_filter(cfg: Fp8Config, module: nn.Module, fqn: str) -> bool:
    """Whether the module at `fqn` should train in fp8: an nn.Linear wide enough to gain from it, or the
    output head when fp8.lm_head asks for it (its 50k-wide output amortises the casts even at width 768).

    Pure (no torchao, no GPU); the signature is torchao's module_filter_fn.
    """
    if not isinstance(module, nn.Linear):
        return False
    n_in, n_out = module.in_features, module.out_features
    if n_in % FP8_DIM_MULTIPLE or n_out % FP8_DIM_MULTIPLE:
        return False
    if fqn == HEAD:
        return cfg.lm_head
    return min(n_in, n_out) >= cfg.min_width


def plan(cfg: Fp8Config, model: nn.Module) -> list[str]:
    """Names (as in named_modules) of the linears that apply() would convert, in model order."""
    names = [fqn for fqn, module in model.named_modules() if layer_filter(cfg, module, fqn)]
    if cfg.lm_head and HEAD not in names and hasattr(model, "wte"):
        rows, width = model.wte.weight.shape
        if not (rows % FP8_DIM_MULTIPLE or width % FP8_DIM_MULTIPLE):
            names.append(HEAD)
    return names


def tie_head(model: nn.Module) -> None:
    """Give `model` an nn.Linear output head that shares the token embedding's Parameter (no copy), so
    torchao can convert it like any other linear; GPT.forward uses it when present."""
    if isinstance(getattr(model, HEAD, None), nn.Module):
        return
    rows, width = model.wte.weight.shape
    head = nn.Linear(width, rows, bias=False, device="meta")
    head.weight = model.wte.weight
    setattr(model, HEAD, head)


# --- Conversion -----------------------------------------------------------------------------------


def torchao_hint() -> str:
    """Which torchao to install for this torch, for error messages."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    # torchao >= 0.17 is built against torch's stable ABI and needs torch >= 2.11; older releases
    # were each built for one exact torch, so a mismatched pair silently loses the compiled kernels.
    if (major, minor) >= (2, 11):
        pin = "torchao>=0.17.0"
    elif (major, minor) == (2, 10):
        pin = "torchao==0.16.0"
    elif (major, minor) == (2, 9):
        pin = "torchao==0.15.0"
    else:
        pin = "torchao (a release built for your torch; fp8 training needs torch >= 2.9)"
    return f"pip install '{pin}' (torch is {torch.__version__})"


def apply(cfg: Fp8Config, model: nn.Module) -> list[str]:
    """Swap the wide nn.Linear layers of `model` for torchao Float8Linear, in place; return their names.

    Call it on the bare model: after moving it to the GPU, before torch.compile and before wrapping
    it in DDP/FSDP. The trainer must compile the model afterwards: torchao's fp8 casts are separate
    kernels in eager mode and only get fused into the matmuls under torch.compile, so an uncompiled
    fp8 model is slower than bf16. Run the forward under bf16 autocast: Float8Linear casts its input
    to the autocast dtype and returns bf16, while the fp32 master weights are scaled to fp8 each step.
    With fp8.lm_head the tied output head becomes an nn.Linear over the embedding's own Parameter and is
    converted too. Returns [] (and needs no torchao) when no layer qualifies.
    """
    problems = validate(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    if not plan(cfg, model):
        return []
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as e:
        raise RuntimeError(
            f"precision=fp8 needs torchao, which could not be imported ({e}); {torchao_hint()}"
        ) from e

    if HEAD in plan(cfg, model):
        tie_head(model)
    converted: list[str] = []

    def keep(module: nn.Module, fqn: str) -> bool:
        # Float8Linear subclasses nn.Linear: skipping it makes a second apply() a no-op, not a double wrap.
        take = layer_filter(cfg, module, fqn) and not isinstance(module, Float8Linear)
        if take:
            converted.append(fqn)
        return take

    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(cfg.recipe), module_filter_fn=keep
    )
    return converted


# --- What the device needs ------------------------------------------------------------------------


def device_problems(device: torch.device) -> list[str]:
    """What stops fp8 training on `device`, in words a user can act on; [] if nothing does."""
    if device.type != "cuda" or not torch.cuda.is_available():
        have = "no CUDA GPU" if not torch.cuda.is_available() else f"a CUDA GPU, but this run is on {device}"
        return [_gpu_message(have)]
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return [_gpu_message(f"{name} (compute capability {major}.{minor})")]
    if importlib.util.find_spec("torchao") is None:
        return [f"precision=fp8 trains through torchao, which is not installed: {torchao_hint()}"]
    return []


def _gpu_message(have: str) -> str:
    need = ".".join(map(str, MIN_CAPABILITY))
    return (
        f"precision=fp8 needs an NVIDIA GPU with compute capability >= {need} (Ada/Hopper); "
        f"this machine has {have}; use precision=bf16"
    )
