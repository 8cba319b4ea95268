"""fp8: which linears convert, config problems, what a device needs, and the torchao call (faked on CPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from greenrun.train import fp8
from greenrun.train.fp8 import Fp8Config
from greenrun.train.model import GPT, ModelConfig


def small_gpt(n_embd: int = 64, n_layer: int = 2) -> GPT:
    return GPT(ModelConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, seq_len=16, vocab_size=300))


def block_linears(n_layer: int) -> list[str]:
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [f"h.{i}.{n}" for i in range(n_layer) for n in names]


def test_plan_at_the_narrow_width_takes_every_block_linear():
    # n_embd=64: c_attn 64->192, attn.c_proj 64->64, c_fc 64->256, mlp.c_proj 256->64; all >= 64 both ways.
    assert fp8.plan(Fp8Config(min_width=64), small_gpt(64)) == block_linears(2)


def test_plan_needs_both_dimensions_wide_enough():
    # Every block linear has one 64-wide side, so nothing reaches 65 or 128.
    assert fp8.plan(Fp8Config(min_width=65), small_gpt(64)) == []
    assert fp8.plan(Fp8Config(min_width=128), small_gpt(64)) == []
    # At n_embd=128 the smallest side is 128, the largest 512.
    assert fp8.plan(Fp8Config(min_width=128), small_gpt(128)) == block_linears(2)
    assert fp8.plan(Fp8Config(min_width=256), small_gpt(128)) == []


def test_plan_leaves_out_the_tied_head_and_default_width_skips_small_models():
    model = small_gpt(64)
    assert not any(name.startswith(("wte", "wpe", "ln")) for name in fp8.plan(Fp8Config(min_width=16), model))
    assert fp8.plan(Fp8Config(), model) == []  # default 2048 is wider than any GPT-2 preset block


def test_layer_filter_is_exact_about_widths_and_multiples_of_16():
    cfg = Fp8Config(min_width=128)
    assert fp8.layer_filter(cfg, nn.Linear(128, 256), "a")
    assert fp8.layer_filter(cfg, nn.Linear(256, 128), "b")
    assert not fp8.layer_filter(cfg, nn.Linear(128, 112), "c")  # out side too narrow
    assert not fp8.layer_filter(cfg, nn.Linear(200, 200), "d")  # 200 is no multiple of 16
    assert not fp8.layer_filter(cfg, nn.Embedding(256, 256), "e")
    assert not fp8.layer_filter(cfg, nn.LayerNorm(256), "f")


def test_validate_defaults_are_clean():
    assert fp8.validate(Fp8Config()) == []


def test_validate_names_the_closest_recipe():
    (problem,) = fp8.validate(Fp8Config(recipe="rowwize"))
    assert "fp8.recipe" in problem and "did you mean rowwise?" in problem


@pytest.mark.parametrize("width", [0, 8, 15, -1])
def test_validate_rejects_widths_below_16(width):
    (problem,) = fp8.validate(Fp8Config(min_width=width))
    assert "fp8.min_width" in problem and ">= 16" in problem


def test_the_tied_head_is_planned_and_shares_the_embedding():
    net = small_gpt(64)
    assert fp8.plan(Fp8Config(min_width=4096), net) == []
    assert fp8.plan(Fp8Config(min_width=4096, lm_head=True), net) == ["lm_head"]  # 320 x 64: multiples of 16
    idx = torch.randint(0, 300, (2, 16))
    _, before = net(idx, idx)
    fp8.tie_head(net)
    assert net.lm_head.weight is net.wte.weight  # one Parameter: the optimizer and checkpoint see one tensor
    assert sum(1 for _ in net.parameters()) == len(list(small_gpt(64).parameters()))
    _, after = net(idx, idx)
    torch.testing.assert_close(after, before)
    assert fp8.plan(Fp8Config(min_width=4096, lm_head=True), net) == [
        "lm_head"
    ]  # converting twice: one entry


def test_a_head_of_odd_width_is_not_planned():
    net = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=40, seq_len=8, vocab_size=300))
    assert fp8.plan(Fp8Config(min_width=4096, lm_head=True), net) == []


def test_device_problems_on_cpu_is_one_actionable_message():
    (problem,) = fp8.device_problems(torch.device("cpu"))
    assert "compute capability >= 8.9 (Ada/Hopper)" in problem
    assert "use precision=bf16" in problem


def fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_device_problems_on_an_older_gpu_names_it(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    (problem,) = fp8.device_problems(torch.device("cuda", 0))
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in problem and "precision=bf16" in problem


def test_device_problems_on_hopper_without_torchao_says_how_to_install(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")
    monkeypatch.setitem(sys.modules, "torchao", None)  # find_spec gives None, import raises
    (problem,) = fp8.device_problems(torch.device("cuda", 0))
    assert "pip install 'torchao" in problem and torch.__version__ in problem


def test_device_problems_on_hopper_with_torchao_is_clean(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: object())  # "torchao is installed"
    assert fp8.device_problems(torch.device("cuda", 0)) == []


def test_apply_without_torchao_raises_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(RuntimeError, match="pip install"):
        fp8.apply(Fp8Config(min_width=64), small_gpt(64))


def test_apply_with_nothing_wide_enough_needs_no_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert fp8.apply(Fp8Config(), small_gpt(64)) == []


def install_fake_torchao(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A stand-in for torchao.float8 that swaps with a marker subclass and records how it was called."""
    seen: dict = {}

    class Float8Linear(nn.Linear):
        pass

    class Float8LinearConfig:
        @staticmethod
        def from_recipe_name(name: str) -> str:
            seen["recipe"] = name
            return f"config:{name}"

    def convert_to_float8_training(module, *, module_filter_fn=None, config=None):
        seen["config"] = config
        for fqn, child in list(module.named_modules()):
            if isinstance(child, nn.Linear) and module_filter_fn(child, fqn):
                parent, _, attr = fqn.rpartition(".")
                swapped = Float8Linear(child.in_features, child.out_features)
                setattr(module.get_submodule(parent), attr, swapped)
        return module

    root = types.ModuleType("torchao")
    float8 = types.ModuleType("torchao.float8")
    float8.Float8LinearConfig = Float8LinearConfig
    float8.convert_to_float8_training = convert_to_float8_training
    linear_mod = types.ModuleType("torchao.float8.float8_linear")
    linear_mod.Float8Linear = Float8Linear
    for name, mod in (
        ("torchao", root),
        ("torchao.float8", float8),
        ("torchao.float8.float8_linear", linear_mod),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    seen["cls"] = Float8Linear
    return seen


def test_apply_passes_recipe_and_filter_to_torchao_and_returns_converted_names(monkeypatch):
    seen = install_fake_torchao(monkeypatch)
    model = small_gpt(128)
    model.h[1].mlp.c_fc = nn.Linear(128, 200)  # not a multiple of 16: must stay as it is
    converted = fp8.apply(Fp8Config(recipe="rowwise", min_width=128), model)
    expected = [n for n in block_linears(2) if n != "h.1.mlp.c_fc"]
    assert converted == expected
    assert seen["recipe"] == "rowwise" and seen["config"] == "config:rowwise"
    assert all(isinstance(model.get_submodule(n), seen["cls"]) for n in expected)
    assert type(model.h[1].mlp.c_fc) is nn.Linear
    # Already-converted layers are skipped, so a second apply converts nothing.
    assert fp8.apply(Fp8Config(recipe="rowwise", min_width=128), model) == []


def test_torchao_hint_pins_a_release_built_for_this_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert "torchao>=0.17.0" in fp8.torchao_hint()
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert "torchao==0.16.0" in fp8.torchao_hint()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_torchao_trains_compiled_in_fp8():
    device = torch.device("cuda")
    if fp8.device_problems(device):
        pytest.skip("; ".join(fp8.device_problems(device)))
    from torchao.float8.float8_linear import Float8Linear

    model = small_gpt(256).to(device)
    converted = fp8.apply(Fp8Config(min_width=256), model)
    assert converted == block_linears(2)  # at n_embd=256 every block linear is >= 256 both ways
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in converted)
    compiled = torch.compile(model)
    idx = torch.randint(0, 300, (8, 16), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = compiled(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.h[0].mlp.c_fc.weight.grad is not None
