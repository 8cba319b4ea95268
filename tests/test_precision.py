"""Precision options as objects: autocast, loss scaling, model preparation, device needs, config checks."""

from __future__ import annotations

import contextlib

import pytest
import torch

from greenrun.train import precision
from greenrun.train.fp8 import Fp8Config
from greenrun.train.model import GPT, ModelConfig
from greenrun.train.precision import PRECISIONS, PrecisionConfig
from tests.test_fp8 import block_linears, fake_gpu, install_fake_torchao, small_gpt

CPU = torch.device("cpu")


def test_get_returns_the_registered_object():
    for name in ("fp32", "fp16", "bf16", "fp8"):
        p = precision.get(name)
        assert p is PRECISIONS.get(name) and p.name == name
    with pytest.raises(KeyError, match="did you mean fp16"):
        precision.get("fp61")


@pytest.mark.parametrize(
    "name, dtype",
    [("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16)],
)
def test_autocast_runs_matmuls_in_the_option_dtype(name, dtype):
    ctx = precision.get(name).autocast(CPU)
    if dtype is None:
        assert isinstance(ctx, contextlib.nullcontext)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with ctx:
        out = a @ b
    assert out.dtype == (dtype or torch.float32)


def test_only_fp16_scales_the_loss():
    enabled = {name: precision.get(name).scaler(CPU).is_enabled() for name in PRECISIONS}
    assert enabled == {"fp32": False, "fp16": True, "bf16": False, "fp8": False}


def test_memory_and_smoke_attributes():
    assert {name: precision.get(name).act_bytes for name in PRECISIONS} == {
        "fp32": 4,
        "fp16": 2,
        "bf16": 2,
        "fp8": 2,
    }
    assert {name: precision.get(name).cpu_stand_in for name in PRECISIONS} == {
        "fp32": "fp32",
        "fp16": "fp16",
        "bf16": "bf16",
        "fp8": "bf16",
    }


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_non_fp8_options_leave_the_model_alone(name):
    model = small_gpt(64)
    before = {n: type(m) for n, m in model.named_modules()}
    cfg = PrecisionConfig(name=name, fp8=Fp8Config(min_width=16))  # fp8 settings must not matter here
    assert precision.get(name).prepare(model, cfg) == []
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert precision.get(name).must_compile([]) is False
    assert precision.get(name).must_compile(["h.0.mlp.c_fc"]) is False


def test_fp8_prepare_converts_through_torchao_and_then_must_compile(monkeypatch):
    seen = install_fake_torchao(monkeypatch)
    model = small_gpt(128)
    fp8 = precision.get("fp8")
    converted = fp8.prepare(model, PrecisionConfig(name="fp8", fp8=Fp8Config(min_width=128)))
    assert converted == block_linears(2)
    assert all(isinstance(model.get_submodule(n), seen["cls"]) for n in converted)
    assert fp8.must_compile(converted) is True
    # Nothing wide enough: nothing converted, and no reason to force a compile.
    assert fp8.prepare(GPT(ModelConfig(n_layer=1)), PrecisionConfig(name="fp8")) == []
    assert fp8.must_compile([]) is False


def test_validate_checks_the_name_and_only_fp8_reads_the_fp8_settings():
    bad_fp8 = Fp8Config(recipe="rowwize", min_width=8)
    assert precision.validate(PrecisionConfig(name="bf16", fp8=bad_fp8)) == []
    problems = precision.validate(PrecisionConfig(name="fp8", fp8=bad_fp8))
    assert len(problems) == 2 and "fp8.recipe" in problems[0] and "fp8.min_width" in problems[1]
    (problem,) = precision.validate(PrecisionConfig(name="bf61", fp8=bad_fp8))
    assert problem.startswith("precision.name: unknown value 'bf61'") and "did you mean bf16?" in problem


def test_device_problems_on_cpu_only_stop_fp8():
    problems = {name: precision.device_problems(PrecisionConfig(name=name), CPU) for name in PRECISIONS}
    assert problems["fp32"] == problems["fp16"] == problems["bf16"] == []
    (fp8_problem,) = problems["fp8"]
    assert "compute capability >= 8.9" in fp8_problem and "precision=bf16" in fp8_problem
    # An unknown name is validate()'s to report, not repeated here.
    assert precision.device_problems(PrecisionConfig(name="bogus"), CPU) == []


def test_bf16_on_a_gpu_without_bf16_suggests_fp16(monkeypatch):
    fake_gpu(monkeypatch, (7, 0), "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    gpu = torch.device("cuda", 0)
    (problem,) = precision.get("bf16").device_problems(gpu)
    assert "compute capability 7.0" in problem and "precision=fp16" in problem
    assert precision.get("fp16").device_problems(gpu) == []
    assert precision.get("fp32").device_problems(gpu) == []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.get("bf16").device_problems(gpu) == []
