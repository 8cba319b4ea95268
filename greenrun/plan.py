"""What a config's full run would cost, and what a budget buys: pure arithmetic, no model is run.

- projection(): the full run of a config (trainer.max_steps steps) in FLOPs, GPU-hours on the target GPU, kWh,
  kg CO2e and dollars, for the end of `greenrun smoke`.
- plan(): a budget (dollars, GPU-hours or kg CO2e) turned into FLOPs, the compute-optimal model size for them
  (Chinchilla: C = 6 N D with D = 20 N), the nearest shipped preset, its max_steps and the command that trains it,
  for `greenrun plan budget.dollars=...`.

Prices, grid intensity, PUE, the GPU's watts and peak FLOP/s and the MFU arrive as plain values (Inputs, which
inputs_from() reads off a Config), so nothing here reads the environment; earlier runs are read from a runs
directory as plain data.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from greenrun.config import Config, ConfigError
from greenrun.core import shipped
from greenrun.history import ARCH_FIELDS, EarlierRun, earlier_runs, measured_mfu
from greenrun.runtime import carbon
from greenrun.runtime.hardware import DENSE_BF16_FLOPS
from greenrun.train import model, target

# Model-FLOPs utilisation of a compiled bf16 GPT-2 run on a recent GPU is typically 0.3-0.5; used, and said to
# be assumed, until a run of the same architecture has measured its own.
ASSUMED_MFU = 0.4
TOKENS_PER_PARAM = 20  # Chinchilla (Hoffmann et al. 2022): compute-optimal training tokens per parameter
DEFAULT_GPU = "h100"  # what a projection assumes when smoke.target names no GPU of the table (auto, cpu, GiB)
BUDGETS = ("dollars", "gpu_hours", "kgco2")  # budget.<kind>=amount
PRICINGS = ("spot", "on_demand")
DEFAULT_RUNS_DIR = Path("runs")  # where run directories go when run.dir names none (conf/config.yaml)
# The keys that price a GPU-hour under one pricing ({pricing}: spot | on_demand), named where a price is missing.
PRICE_KEYS = "energy.{pricing}_usd_per_gpu_hour or energy.usd_per_gpu_hour"


@dataclass(frozen=True)
class GpuSpec:
    name: str  # a smoke.target GPU name, e.g. h100
    label: str  # the product, e.g. "NVIDIA H200"
    peak_flops: float  # dense bf16 FLOP/s of one GPU (datasheet); 0.0 = unknown to runtime/hardware.py
    watts: float  # board power (TDP), from train/target.py's GPU table


def gpu_spec(name: str) -> GpuSpec | None:
    """The GPU smoke.target `name` names (case and `_` vs `-` do not matter), or None for auto, cpu or a size."""
    key = str(name).strip().lower().replace("_", "-")
    gpu = target.GPUS.get(key)
    if gpu is None:
        return None
    # hardware's table is keyed by the names CUDA reports, which the vendor's product label contains.
    peak = next((p for k, p in DENSE_BF16_FLOPS if k in gpu.label), 0.0)
    return GpuSpec(gpu.name, gpu.label, peak, gpu.watts)


def target_gpu(smoke_target: str) -> tuple[GpuSpec, str]:
    """(the GPU to project onto, how it was chosen): the one smoke.target names, else DEFAULT_GPU, assumed."""
    spec = gpu_spec(smoke_target)
    if spec is not None:
        return spec, f"smoke.target={smoke_target}"
    fallback = gpu_spec(DEFAULT_GPU)
    assert fallback is not None
    return fallback, f"assumed: smoke.target={smoke_target} names no GPU; set smoke.target=<gpu> to choose"


@dataclass(frozen=True)
class Inputs:
    gpu: GpuSpec
    gpu_why: str  # how the GPU was chosen, e.g. "smoke.target=h100"
    pue: float  # facility power over IT power, >= 1 (energy.pue)
    grid_kg_per_kwh: float  # grid intensity, kg CO2e per kWh
    grid_source: str  # where the intensity comes from
    spot_usd: float | None  # price of one spot GPU-hour; None = not priced
    on_demand_usd: float | None  # price of one on-demand GPU-hour; None = not priced
    mfu: float = ASSUMED_MFU  # model-FLOPs utilisation where no earlier run of the model has measured one
    mfu_source: str = "assumed"  # where `mfu` comes from
    # The settings that price a GPU-hour, named where one is missing; "{pricing}" becomes spot or on_demand.
    price_hint: str = "energy.usd_per_gpu_hour"

    def price(self, pricing: str) -> float | None:
        if pricing not in PRICINGS:
            raise ValueError(f"pricing: expected one of {', '.join(PRICINGS)}, got {pricing!r}")
        return self.spot_usd if pricing == "spot" else self.on_demand_usd

    def hint(self, pricing: str) -> str:
        return self.price_hint.replace("{pricing}", pricing)


def inputs_from(cfg: Config) -> Inputs:
    """The Inputs `cfg` states: smoke.target's GPU, energy.pue, carbon's grid intensity and both prices."""
    gpu, why = target_gpu(str(cfg.smoke.target))
    kg, source = carbon.grid_intensity(cfg.energy)
    spot, on_demand = (carbon.gpu_hour_price(cfg.energy, p) for p in PRICINGS)
    return Inputs(gpu, why, cfg.energy.pue, kg, source, spot, on_demand, price_hint=PRICE_KEYS)


def runs_dir_of(cfg: Config) -> Path:
    """Where the earlier runs of `cfg` live: the directory above run.dir (DEFAULT_RUNS_DIR if unset)."""
    return Path(cfg.run.dir).parent if str(cfg.run.dir).strip() else DEFAULT_RUNS_DIR


@dataclass(frozen=True)
class Cost:
    gpu_hours: float  # summed over every GPU
    kwh: float  # at the wall: GPU-hours x watts x PUE
    kg_co2e: float  # kwh x grid intensity
    spot_usd: float | None  # None = not priced
    on_demand_usd: float | None


def cost(flops: float, mfu: float, inputs: Inputs) -> Cost | None:
    """What `flops` of training cost on inputs.gpu at `mfu`; None when the GPU's peak FLOP/s is unknown."""
    if inputs.gpu.peak_flops <= 0 or mfu <= 0:
        return None
    gpu_hours = flops / (inputs.gpu.peak_flops * mfu * 3600)
    kwh = gpu_hours * inputs.gpu.watts / 1000 * inputs.pue
    spot, on_demand = (None if p is None else gpu_hours * p for p in (inputs.spot_usd, inputs.on_demand_usd))
    return Cost(gpu_hours, kwh, kwh * inputs.grid_kg_per_kwh, spot, on_demand)


def tokens_per_step(cfg: Config, world_size: int, seq_len: int | None = None) -> int:
    """Tokens one optimizer step trains on (micro-batch x seq_len x accumulation x world, as the trainer counts);
    for micro_batch_size=auto, trainer.global_batch_tokens, which the probe keeps the step close to."""
    t = cfg.trainer
    if isinstance(t.micro_batch_size, int):
        return t.micro_batch_size * (seq_len or cfg.model.seq_len) * t.grad_accum_steps * world_size
    return t.global_batch_tokens


# --- projection: the full run of a config --------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    model: str
    params: int  # all parameters, embeddings included
    flops_per_token: float  # model.flops_per_token: 6 N + the attention term, forward + backward
    tokens_per_step: int
    max_steps: int
    world_size: int
    flops: float  # tokens x flops_per_token
    mfu: float
    mfu_source: str  # "assumed" or the run that measured it
    inputs: Inputs
    cost: Cost | None  # None: the GPU's peak FLOP/s is unknown

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step


def projection(
    cfg: Config, inputs: Inputs, *, world_size: int = 1, runs_dir: Path | None = None
) -> Projection:
    """The full run of `cfg` on `world_size` of inputs.gpu, at the MFU an earlier run of the same architecture in
    `runs_dir` measured, else at inputs.mfu (assumed)."""
    per_token = model.flops_per_token(cfg.model)
    step_tokens = tokens_per_step(cfg, world_size)
    flops = cfg.trainer.max_steps * step_tokens * per_token
    measured = measured_mfu(earlier_runs(runs_dir), cfg.model)
    mfu, source = (inputs.mfu, inputs.mfu_source) if measured is None else _measured(measured)
    return Projection(
        cfg.model.name,
        model.count_params(cfg.model, non_embedding=False),
        per_token,
        step_tokens,
        cfg.trainer.max_steps,
        world_size,
        flops,
        mfu,
        source,
        inputs,
        cost(flops, mfu, inputs),
    )


def _measured(run: EarlierRun) -> tuple[float, str]:
    assert run.mfu is not None
    return run.mfu, f"measured by {run.dir}, on its own GPU"


def _count(n: float) -> str:
    """1234567 -> '1.23M': counts of parameters and tokens."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _usd(value: float | None, inputs: Inputs, pricing: str) -> str:
    return f"${value:,.2f}" if value is not None else f"not priced (set {inputs.hint(pricing)})"


def _cost_lines(c: Cost, inputs: Inputs, world_size: int) -> list[str]:
    return [
        f"  time: {c.gpu_hours:.3g} GPU-hours ({c.gpu_hours / world_size:.3g} h on {_gpus(world_size)})",
        f"  energy: {c.kwh:.3g} kWh = GPU-hours x {inputs.gpu.watts:.0f} W (the GPU's TDP from a datasheet "
        f"table, assumed drawn throughout) x PUE {inputs.pue:g}",
        f"  carbon: {c.kg_co2e:.3g} kg CO2e = kWh x {inputs.grid_kg_per_kwh:g} kg/kWh ({inputs.grid_source})",
        f"  cost: spot {_usd(c.spot_usd, inputs, 'spot')}, on-demand "
        f"{_usd(c.on_demand_usd, inputs, 'on_demand')}",
    ]


def _gpu_line(inputs: Inputs, mfu: float, mfu_source: str) -> str:
    gpu = inputs.gpu
    return (
        f"  on {gpu.label} ({inputs.gpu_why}): {gpu.peak_flops / 1e12:.0f} TFLOP/s dense bf16 peak (datasheet) "
        f"x MFU {mfu:.2f} ({mfu_source})"
    )


def format_projection(p: Projection) -> list[str]:
    """Console lines for the end of `greenrun smoke`, each saying which inputs are assumed and which measured."""
    lines = [
        f"projection of the full run: {p.max_steps:,} steps x {p.tokens_per_step:,} tokens/step = "
        f"{_count(p.tokens)} tokens on {_gpus(p.world_size)}",
        f"  model {p.model}: {_count(p.params)} parameters, {p.flops_per_token / 1e6:.4g} MFLOP/token "
        "(6 N + 12 L H Q T attention, forward + backward)",
        f"  compute: {p.flops:.3g} FLOPs = tokens x FLOP/token",
    ]
    if p.cost is None:
        return [
            *lines,
            f"  time, energy, cost: not projected (no peak FLOP/s for {p.inputs.gpu.label} in "
            "greenrun.runtime.hardware; set smoke.target=<gpu>)",
        ]
    return [
        *lines,
        _gpu_line(p.inputs, p.mfu, p.mfu_source) + "; GPU-hours = FLOPs / (peak x MFU x 3600)",
        *_cost_lines(p.cost, p.inputs, p.world_size),
    ]


def projection_lines(cfg: Config, *, world_size: int = 1) -> list[str]:
    """format_projection of `cfg`'s full run, its inputs read from `cfg` and its MFU from the runs beside it."""
    inputs = inputs_from(cfg)
    return format_projection(projection(cfg, inputs, world_size=world_size, runs_dir=runs_dir_of(cfg)))


# --- plan: what a budget buys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    kind: str  # one of BUDGETS
    amount: float  # dollars, GPU-hours or kg CO2e


@dataclass(frozen=True)
class Plan:
    budget: Budget
    pricing: str  # the price a dollar budget was converted at
    gpu_hours: float  # what the budget buys
    flops: float  # C = GPU-hours x peak x MFU x 3600
    mfu: float
    mfu_source: str  # "assumed" or the earlier run of the preset that measured it
    optimal_params: float  # N = sqrt(C / 120)
    optimal_tokens: float  # D = 20 N
    preset: str  # the shipped model preset nearest N on a log scale
    params: int  # its parameters, embeddings included
    flops_per_token: float
    tokens_per_step: int
    world_size: int
    max_steps: int  # the steps of the preset the budget pays for
    command: str
    cost: Cost  # of those max_steps
    inputs: Inputs
    earlier: list[EarlierRun] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step


def chinchilla(flops: float) -> tuple[float, float]:
    """(N, D) with C = 6 N D and D = 20 N: N = sqrt(C / 120), D = 20 N."""
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def nearest_preset(params: float) -> str:
    """The shipped preset (conf/model) whose parameter count is nearest `params` on a log scale."""
    sizes = {
        name: model.count_params(model.preset(name), non_embedding=False)
        for name in shipped.option_names("model")
    }
    return min(sizes, key=lambda name: abs(math.log(sizes[name] / params)))


def budget_gpu_hours(budget: Budget, inputs: Inputs, pricing: str = "spot") -> float:
    """GPU-hours of inputs.gpu a budget buys; ConfigError when it cannot be converted (no price, say)."""
    key = f"budget.{budget.kind}"
    if budget.kind not in BUDGETS:
        raise ConfigError([f"{key}: unknown budget; use one of " + ", ".join(f"budget.{b}" for b in BUDGETS)])
    if not budget.amount > 0:
        raise ConfigError([f"{key}: must be > 0, got {budget.amount}"])
    if budget.kind == "gpu_hours":
        return budget.amount
    if budget.kind == "dollars":
        price = inputs.price(pricing)
        if not price:
            raise ConfigError([f"{key}: the {pricing} GPU-hour is not priced (set {inputs.hint(pricing)})"])
        return budget.amount / price
    if not inputs.grid_kg_per_kwh > 0 or not inputs.gpu.watts > 0:
        raise ConfigError(
            [f"{key}: needs a grid intensity > 0 kg/kWh ({inputs.grid_source}) and the GPU's watts"]
        )
    kwh = budget.amount / inputs.grid_kg_per_kwh
    return kwh * 1000 / (inputs.gpu.watts * inputs.pue)


def _replaced(override: str) -> bool:
    """Whether the plan's command sets this override itself (the model, its shape, max_steps) or it is a budget."""
    key = override.split("=")[0].lstrip("+~")
    shape = {"model", "trainer.max_steps", *(f"model.{f}" for f in ARCH_FIELDS)}
    return key in shape or key.startswith("budget.")


def plan(
    budget: Budget,
    inputs: Inputs,
    cfg: Config,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int = 1,
    runs_dir: Path | None = None,
    pricing: str = "spot",
) -> Plan:
    """The compute-optimal preset for `budget` and the command that trains it: `cfg`'s trainer (micro-batch,
    accumulation) at the preset's seq_len on `world_size` GPUs; `overrides` (the user's other ones) are repeated
    in the command. ConfigError when the budget cannot be converted or buys less than one step."""
    if inputs.gpu.peak_flops <= 0:
        raise ConfigError(
            [f"no peak FLOP/s for {inputs.gpu.label}; set smoke.target=<gpu> to plan on another"]
        )
    gpu_hours = budget_gpu_hours(budget, inputs, pricing)
    runs = earlier_runs(runs_dir)
    mfu, mfu_source = inputs.mfu, inputs.mfu_source
    name = nearest_preset(chinchilla(gpu_hours * inputs.gpu.peak_flops * mfu * 3600)[0])
    # An earlier run of that preset measured its MFU: use it, unless the compute it gives picks another preset
    # (whose own MFU nobody measured), so the MFU reported is always the chosen preset's.
    measured = measured_mfu(runs, model.preset(name))
    if measured is not None:
        again = nearest_preset(
            chinchilla(gpu_hours * inputs.gpu.peak_flops * _measured(measured)[0] * 3600)[0]
        )
        if again == name:
            mfu, mfu_source = _measured(measured)
    flops = gpu_hours * inputs.gpu.peak_flops * mfu * 3600
    n, d = chinchilla(flops)
    chosen = model.preset(name)
    per_token = model.flops_per_token(chosen)
    step_tokens = tokens_per_step(cfg, world_size, chosen.seq_len)
    # Spend the budget, not exactly 20 tokens per parameter: the preset is only near N.
    max_steps = int(flops / per_token // step_tokens)
    if max_steps < 1:
        raise ConfigError([f"budget.{budget.kind}={budget.amount:g} buys less than one step of {name}"])
    spent = cost(max_steps * step_tokens * per_token, mfu, inputs)
    assert spent is not None
    kept = [o for o in overrides if not _replaced(o)]
    launch = (
        ["greenrun"] if world_size == 1 else ["torchrun", f"--nproc_per_node={world_size}", "-m", "greenrun"]
    )
    command = shlex.join([*launch, "train", f"model={name}", f"trainer.max_steps={max_steps}", *kept])
    earlier = [r for r in runs if r.val_loss is not None]
    return Plan(
        budget,
        pricing,
        gpu_hours,
        flops,
        mfu,
        mfu_source,
        n,
        d,
        name,
        model.count_params(chosen, non_embedding=False),
        per_token,
        step_tokens,
        world_size,
        max_steps,
        command,
        spent,
        inputs,
        earlier,
    )


def format_plan(p: Plan) -> list[str]:
    """Console lines for `greenrun plan`: the conversion, the formula, the preset, the command, earlier runs."""
    b, i = p.budget, p.inputs
    how = {
        "gpu_hours": "",
        "dollars": f" at {_usd(i.price(p.pricing), i, p.pricing)} per {p.pricing} GPU-hour",
        "kgco2": f" at {i.grid_kg_per_kwh:g} kg/kWh ({i.grid_source}), "
        f"{i.gpu.watts:.0f} W TDP (assumed) x PUE {i.pue:g}",
    }[b.kind]
    lines = [
        f"budget.{b.kind}={b.amount:g} buys {p.gpu_hours:.3g} GPU-hours{how}",
        _gpu_line(i, p.mfu, p.mfu_source),
        f"  compute: C = GPU-hours x peak x MFU x 3600 = {p.flops:.3g} FLOPs",
        f"  compute-optimal (Chinchilla, C = 6 N D, D = {TOKENS_PER_PARAM} N): N = sqrt(C / 120) = "
        f"{_count(p.optimal_params)} parameters, D = {TOKENS_PER_PARAM} N = {_count(p.optimal_tokens)} tokens",
        f"  nearest shipped preset (conf/model, by parameters on a log scale): {p.preset}, "
        f"{_count(p.params)} parameters, {p.flops_per_token / 1e6:.4g} MFLOP/token",
        f"  the budget trains it on {_count(p.tokens)} tokens ({p.tokens / p.params:.3g} tokens per parameter): "
        f"{p.max_steps:,} steps x {p.tokens_per_step:,} tokens/step",
        *_cost_lines(p.cost, i, p.world_size),
        f"  run: {p.command}",
    ]
    if p.earlier:
        lines.append("  earlier runs, for comparison (final validation loss):")
        lines += [
            f"    {r.dir}: {r.model}, {_count(r.params) if r.params else '?'} parameters, "
            f"{_count(r.tokens) if r.tokens else '?'} tokens, val_loss {r.val_loss:.4f}"
            for r in p.earlier
        ]
    return lines
