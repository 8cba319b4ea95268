"""Activation checkpointing: the plans themselves, and that recomputation never changes gradients."""

import math

import pytest
import torch

from greenrun.train import model as model_module
from greenrun.train.activation_checkpointing import (
    POLICIES,
    ActivationCheckpointingConfig,
    apply,
    plan,
    validate,
)
from greenrun.train.model import GPT, ModelConfig

AC = ActivationCheckpointingConfig


def test_plans_for_four_blocks():
    assert plan(AC("none"), 4) == ["none"] * 4
    assert plan(AC("full"), 4) == ["full"] * 4
    assert plan(AC("selective"), 4) == ["selective"] * 4
    assert plan(AC("every_k", every=2), 4) == ["full", "none", "full", "none"]
    assert plan(AC("every_k", every=3), 4) == ["full", "none", "none", "full"]
    assert plan(AC("every_k", every=1), 4) == ["full"] * 4
    assert plan(AC("sqrt"), 4) == ["full", "none", "full", "none"]


def test_sqrt_plan_for_gpt2_depth():
    # L=12 -> k=3: blocks 11, 8, 5, 2 keep their activations, the other 8 are recomputed.
    assert plan(AC("sqrt"), 12) == ["full", "full", "none"] * 4


@pytest.mark.parametrize("n_layer", range(1, 65))
def test_sqrt_plan_keeps_about_sqrt_l_blocks(n_layer):
    modes = plan(AC("sqrt"), n_layer)
    k = max(1, round(math.sqrt(n_layer)))
    assert len(modes) == n_layer and set(modes) <= {"none", "full"}
    assert modes[-1] == "none"  # backward starts there, so it is never worth recomputing
    assert modes.count("none") == math.ceil(n_layer / k)
    assert modes.count("none") <= math.sqrt(n_layer) + 2


def test_validate_reports_problems_with_suggestions():
    assert validate(AC(), 4) == []
    for policy in POLICIES:
        assert validate(AC(policy), 12) == []
    problems = validate(AC("sqr"), 4)
    assert len(problems) == 1 and "did you mean sqrt" in problems[0]
    assert any("every" in p for p in validate(AC("every_k", every=0), 4))
    assert len(validate(AC("bogus", every=-1), 4)) == 2
    with pytest.raises(ValueError, match="selectiv"):
        plan(AC("selectiv"), 4)


def test_apply_sets_the_model_plan():
    model = GPT(ModelConfig(n_layer=3))
    assert model.recompute == ["none"] * 3
    assert apply(model, AC("every_k", every=2)) == ["full", "none", "full"]
    assert model.recompute == ["full", "none", "full"]


def test_no_checkpointing_outside_training(monkeypatch):
    calls = []
    real = model_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", spy)
    model = GPT(ModelConfig(n_layer=2))
    apply(model, AC("full"))
    idx = torch.randint(0, 4096, (1, 8))
    model.eval()
    model(idx, idx)
    model.train()
    with torch.no_grad():
        model(idx, idx)
    assert calls == []
    model(idx, idx)
    assert len(calls) == 2


def _grads(policy: str, every: int = 2, dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(dropout=dropout))
    apply(model, AC(policy, every=every))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=g)
    targets = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=g)
    torch.manual_seed(2)  # dropout masks: checkpoint must replay exactly these in recompute
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return {dropout: _grads("none", dropout=dropout) for dropout in (0.0, 0.1)}


@pytest.mark.parametrize(
    "policy,every,dropout",
    [
        ("full", 2, 0.0),
        ("every_k", 2, 0.0),
        ("sqrt", 2, 0.0),
        ("selective", 2, 0.0),
        ("full", 2, 0.1),
        ("selective", 2, 0.1),
    ],
)
def test_recompute_gives_identical_gradients(reference, policy, every, dropout):
    ref_loss, ref_grads = reference[dropout]
    loss, grads = _grads(policy, every, dropout)
    # Recomputation replays the same kernels on the same inputs, so on CPU the results are exact.
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
