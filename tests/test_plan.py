"""greenrun.plan and greenrun.history: the projection arithmetic by hand, the Chinchilla inversion, the nearest
preset, the three budget kinds, unpriced GPU-hours, and what earlier run directories measured and reached."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from greenrun import history, plan
from greenrun.config import Config, ConfigError
from greenrun.train import model
from greenrun.train.model import ModelConfig

# One block, width 32: parameters and FLOPs per token small enough to count by hand below.
SMALL = ModelConfig(name="small", n_layer=1, n_head=2, n_embd=32, seq_len=16, vocab_size=64)
GPU = plan.GpuSpec("test", "Test GPU", peak_flops=1e12, watts=400)


def _inputs(**changes) -> plan.Inputs:
    base = plan.Inputs(GPU, "test", 1.5, 0.5, "test grid", spot_usd=2.0, on_demand_usd=None, mfu=0.5)
    return dataclasses.replace(base, **changes)


def _cfg(m: ModelConfig = SMALL, **trainer) -> Config:
    base = Config()
    t = {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 1000, **trainer}
    return dataclasses.replace(base, model=m, trainer=dataclasses.replace(base.trainer, **t))


def _run(runs: Path, name: str, m: ModelConfig, records: list[dict], summary: dict | None = None) -> Path:
    d = runs / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        yaml.safe_dump({"model": dataclasses.asdict(m), "trainer": {"max_steps": 9}})
    )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_projection_arithmetic_by_hand():
    # Non-embedding parameters of SMALL (C = 32, biases on): 2 LayerNorms (64 each), attention
    # 32*96 + 96 + 32*32 + 32 = 4224, MLP 32*128 + 128 + 128*32 + 32 = 8352, final LayerNorm 64.
    non_embedding = 2 * 64 + 4224 + 8352 + 64
    assert model.count_params(SMALL) == non_embedding == 12768
    # flops_per_token: 6 (N + head 64*32) + 12 L H Q T with Q = 16, T = 16.
    per_token = 6 * (12768 + 64 * 32) + 12 * 1 * 2 * 16 * 16
    assert per_token == 95040
    p = plan.projection(_cfg(), _inputs(), world_size=2)
    assert p.tokens_per_step == 4 * 16 * 2 * 2 and p.tokens == 1000 * 256
    assert p.flops == 256_000 * per_token
    gpu_hours = 256_000 * 95040 / (1e12 * 0.5 * 3600)
    assert p.mfu_source == "assumed" and p.cost is not None
    assert math.isclose(p.cost.gpu_hours, gpu_hours)
    assert math.isclose(p.cost.kwh, gpu_hours * 400 / 1000 * 1.5)
    assert math.isclose(p.cost.kg_co2e, gpu_hours * 0.6 * 0.5)
    assert math.isclose(p.cost.spot_usd, gpu_hours * 2.0) and p.cost.on_demand_usd is None
    text = "\n".join(plan.format_projection(p))
    assert "MFU 0.50 (assumed)" in text and "TDP" in text and "test grid" in text


def test_unknown_price_is_not_priced_never_zero():
    p = plan.projection(_cfg(), _inputs(spot_usd=None))
    cost_line = next(line for line in plan.format_projection(p) if "cost:" in line)
    assert cost_line.count("not priced (set energy.usd_per_gpu_hour)") == 2 and "$" not in cost_line
    with pytest.raises(ConfigError, match="spot GPU-hour is not priced"):
        plan.plan(plan.Budget("dollars", 10), _inputs(spot_usd=None), _cfg())
    with pytest.raises(ConfigError, match="on_demand GPU-hour is not priced"):
        plan.plan(plan.Budget("dollars", 10), _inputs(), _cfg(), pricing="on_demand")


def test_a_gpu_without_a_peak_is_not_projected():
    p = plan.projection(_cfg(), _inputs(gpu=dataclasses.replace(GPU, peak_flops=0.0)))
    assert p.cost is None and "not projected" in plan.format_projection(p)[-1]


def test_target_gpu_reads_the_tables():
    h200, why = plan.target_gpu("H200")
    assert (h200.peak_flops, h200.watts, why) == (989e12, 700, "smoke.target=H200")
    assert plan.gpu_spec("a100_80gb").peak_flops == 312e12
    assert plan.gpu_spec("auto") is None
    fallback, why = plan.target_gpu("auto")
    assert fallback.name == plan.DEFAULT_GPU and why.startswith("assumed")
    assert all(gpu.watts > 0 for gpu in plan.target.GPUS.values())  # every GPU has its board power


def test_chinchilla_inversion():
    for c in (1e15, 3.7e19, 6e23):
        n, d = plan.chinchilla(c)
        assert math.isclose(n * 20 * n * 6, c) and math.isclose(d, 20 * n)


def test_nearest_preset_on_a_log_scale():
    assert plan.nearest_preset(1e6) == "tiny"
    assert plan.nearest_preset(124e6) == "gpt2"
    assert plan.nearest_preset(1e11) == "gpt2-xl"
    medium, large = (
        model.count_params(model.preset(n), non_embedding=False) for n in ("gpt2-medium", "gpt2-large")
    )
    middle = math.sqrt(medium * large)  # the geometric mean: equally far from both on a log scale
    assert plan.nearest_preset(middle * 0.98) == "gpt2-medium"
    assert plan.nearest_preset(middle * 1.02) == "gpt2-large"


def test_the_three_budget_kinds_buy_the_same_compute():
    inputs = _inputs()  # $2 per spot GPU-hour; 400 W x PUE 1.5 at 0.5 kg/kWh
    ten_hours = [
        plan.Budget("gpu_hours", 10),
        plan.Budget("dollars", 20),
        plan.Budget("kgco2", 10 * 400 / 1000 * 1.5 * 0.5),
    ]
    plans = [plan.plan(b, inputs, _cfg()) for b in ten_hours]
    c = 10 * 1e12 * 0.5 * 3600
    for p in plans:
        assert math.isclose(p.gpu_hours, 10) and math.isclose(p.flops, c)
        assert math.isclose(p.optimal_params, math.sqrt(c / 120))
    lines = plan.format_plan(plans[1])
    assert any("N = sqrt(C / 120)" in line for line in lines)
    assert "at $2.00 per spot GPU-hour" in lines[0]


def test_plan_spends_the_budget_on_the_nearest_preset_and_gives_the_command():
    c = 10 * 1e12 * 0.5 * 3600  # N = sqrt(C / 120) = 1.22M: tiny
    p = plan.plan(
        plan.Budget("gpu_hours", 10),
        _inputs(),
        _cfg(),
        overrides=[
            "+recipe=gpt2_gpu",
            "budget.gpu_hours=10",
            "trainer.max_steps=5",
            "model.n_layer=3",
            "x=a b",
        ],
    )
    tiny = model.preset("tiny")
    assert p.preset == "tiny" and p.tokens_per_step == 4 * tiny.seq_len * 2
    assert p.max_steps == int(c / model.flops_per_token(tiny) // p.tokens_per_step)
    assert (
        p.tokens * model.flops_per_token(tiny)
        <= c
        < (p.tokens + p.tokens_per_step) * model.flops_per_token(tiny)
    )
    assert p.command == f"greenrun train model=tiny trainer.max_steps={p.max_steps} +recipe=gpt2_gpu 'x=a b'"
    two = plan.plan(plan.Budget("gpu_hours", 10), _inputs(), _cfg(), world_size=2)
    assert two.command.startswith("torchrun --nproc_per_node=2 -m greenrun train model=tiny")
    assert two.tokens_per_step == 2 * p.tokens_per_step


def test_budgets_that_cannot_be_converted():
    with pytest.raises(ConfigError, match="must be > 0"):
        plan.plan(plan.Budget("gpu_hours", 0), _inputs(), _cfg())
    with pytest.raises(ConfigError, match="unknown budget"):
        plan.plan(plan.Budget("euros", 5), _inputs(), _cfg())
    with pytest.raises(ConfigError, match="grid intensity"):
        plan.plan(plan.Budget("kgco2", 5), _inputs(grid_kg_per_kwh=0.0), _cfg())
    with pytest.raises(ConfigError, match="less than one step"):
        plan.plan(plan.Budget("gpu_hours", 1e-12), _inputs(), _cfg())


def test_projection_takes_the_mfu_an_earlier_run_of_the_same_model_measured(tmp_path):
    runs = tmp_path / "runs"
    # The first window (compilation) is left out; the median of the rest is 0.32.
    _run(runs, "same", SMALL, [{"step": 0, "val_loss": 5.0}, *({"mfu": m} for m in (0.05, 0.30, 0.34, 0.32))])
    _run(runs, "wider", dataclasses.replace(SMALL, n_embd=64), [{"mfu": 0.9}, {"mfu": 0.9}])
    odd = runs / "odd"
    odd.mkdir()
    (odd / "config.yaml").write_text("model:\n  n_layer: ${oc.env:HOME}\n")  # plain data: never resolved
    (odd / "metrics.jsonl").write_text('{"mfu": 0.7}\n{"mf')  # and a torn last line
    p = plan.projection(_cfg(), _inputs(), runs_dir=runs)
    assert p.mfu == pytest.approx(0.32) and p.mfu_source.startswith(f"measured by {runs / 'same'}")
    assert math.isclose(p.cost.gpu_hours, p.flops / (1e12 * 0.32 * 3600))
    assert f"MFU 0.32 (measured by {runs / 'same'}" in "\n".join(plan.format_projection(p))
    odd_run = next(r for r in history.earlier_runs(runs) if r.dir == odd)
    assert odd_run.arch is None and odd_run.params is None and odd_run.mfu == 0.7
    assert plan.projection(_cfg(dataclasses.replace(SMALL, n_head=4)), _inputs(), runs_dir=runs).mfu == 0.5


def test_plan_uses_the_chosen_presets_measured_mfu(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "tiny", model.preset("tiny"), [{"mfu": 0.1}, {"mfu": 0.25}])
    p = plan.plan(plan.Budget("gpu_hours", 10), _inputs(), _cfg(), runs_dir=runs)
    assert p.preset == "tiny" and p.mfu == 0.25 and p.mfu_source.startswith("measured by")
    assert math.isclose(p.flops, 10 * 1e12 * 0.25 * 3600)


def test_plan_lists_the_loss_earlier_runs_reached(tmp_path):
    runs = tmp_path / "runs"
    # summary.json wins over metrics.jsonl; without it, the last evaluation in metrics.jsonl counts.
    _run(
        runs, "done", SMALL, [{"step": 10, "tokens": 640, "val_loss": 4.0}], {"val_loss": 3.5, "tokens": 1280}
    )
    _run(
        runs,
        "killed",
        SMALL,
        [{"tokens": 64, "val_loss": 6.0}, {"tokens": 128, "val_loss": 5.5}, {"mfu": 0.1}],
    )
    _run(runs, "never evaluated", SMALL, [{"step": 1, "loss": 7.0}])
    p = plan.plan(plan.Budget("gpu_hours", 10), _inputs(), _cfg(), runs_dir=runs)
    reached = {r.dir.name: (r.model, r.tokens, r.val_loss) for r in p.earlier}
    assert reached == {"done": ("small", 1280, 3.5), "killed": ("small", 128, 5.5)}
    lines = plan.format_plan(p)
    assert any("done: small, 15.3k parameters, 1.28k tokens, val_loss 3.5000" in line for line in lines)
    assert (
        plan.plan(plan.Budget("gpu_hours", 10), _inputs(), _cfg(), runs_dir=tmp_path / "none").earlier == []
    )
