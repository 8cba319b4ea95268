"""Each optimizer option: it learns, its state is what state_bytes says, it resumes exactly, and the options
that cannot run somewhere say so before anything is built."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from greenrun.core.shipped import load_option, option_names
from greenrun.train import fp8, memory, optimizer
from greenrun.train.model import GPT, ModelConfig, preset
from greenrun.train.optimizer import OPTIMIZERS, Lion, MuonWithAdamW, OptimizerConfig
from tests.common import straight_and_sliced
from tests.test_resume import STEPS
from tests.test_resume import losses as run_losses

CPU = torch.device("cpu")
ON_CPU = ["adamw", "adafactor", "lion", "muon"]  # adamw8bit is CUDA only
TINY = ModelConfig(n_layer=2, n_embd=32, n_head=2, seq_len=16, vocab_size=64)
# One sequence repeated: learnable, so 20 steps of any working optimizer lower the loss clearly.
DATA = torch.randint(64, (1, TINY.seq_len + 1), generator=torch.Generator().manual_seed(0)).repeat(4, 1)


def shipped(name: str, **changes) -> OptimizerConfig:
    """The option's config as `optimizer=<name>` composes it: its YAML over the dataclass defaults."""
    return OptimizerConfig(**{**load_option("optimizer", name), **changes})


def fresh(cfg: ModelConfig = TINY, device: torch.device = CPU) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).to(device)


def train(net: GPT, opt: torch.optim.Optimizer, steps: int, lr: float | None = None, first: int = 0) -> list:
    """Losses of `steps` steps, the lr set per group as the trainer does (times the group's lr_scale) and
    decaying with the step, so a resumed optimizer must take the lr from the loop and not from its state."""
    data = DATA.to(next(net.parameters()).device)
    losses = []
    for step in range(first, first + steps):
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr * (1 - step / 100) * group.get("lr_scale", 1.0)
        _, loss = net(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor really holds: a tensor subclass (torchao's 8-bit moments) by its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_the_registry_holds_the_five_options_and_each_has_a_yaml():
    assert sorted(OPTIMIZERS.names()) == ["adafactor", "adamw", "adamw8bit", "lion", "muon"]
    assert option_names("optimizer") == sorted(OPTIMIZERS.names())
    for name in OPTIMIZERS:
        assert optimizer.validate(shipped(name)) == []


@pytest.mark.parametrize("name", ON_CPU)
def test_each_optimizer_lowers_the_loss_of_the_tiny_model(name):
    cfg = shipped(name)
    net = fresh()
    losses = train(net, optimizer.build(cfg, net), 20, lr=cfg.lr)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("name", ON_CPU)
def test_state_bytes_are_the_bytes_of_every_state_tensor(name):
    cfg = shipped(name)
    net = fresh()
    opt = optimizer.build(cfg, net)
    train(net, opt, 1, lr=cfg.lr)
    real = state_bytes(opt)
    assert real > 0
    assert OPTIMIZERS.get(name).state_bytes(net) == real  # exact: step counters included
    # The memory estimate asks a meta-device model of the same config, and gets the same answer.
    assert memory.estimate(TINY, 2, 16, "fp32", ["none"] * 2, name).optimizer_state == real


def test_state_per_parameter_for_gpt2_is_what_each_option_promises():
    with torch.device("meta"):
        gpt2 = GPT(preset("gpt2"))
    n = sum(p.numel() for p in gpt2.parameters())
    per_param = {name: OPTIMIZERS.get(name).state_bytes(gpt2) / n for name in OPTIMIZERS}
    assert 8.0 < per_param["adamw"] < 8.001  # two fp32 moments (+ a step counter per tensor)
    assert 2.0 < per_param["adamw8bit"] < 2.05  # two 8-bit moments + 2 x 4 bytes per 256-value block
    assert 4.0 <= per_param["lion"] < 4.001  # one fp32 momentum
    assert per_param["adafactor"] < 0.02  # row and column factors
    # Muon keeps one momentum on the block matrices, AdamW's two on the embeddings (32% of GPT-2's parameters).
    assert 5.2 < per_param["muon"] < 5.3


@pytest.mark.parametrize("name", ON_CPU)
def test_state_dict_round_trip_continues_bit_identically(name):
    cfg = shipped(name)
    net = fresh()
    opt = optimizer.build(cfg, net)
    train(net, opt, 3, lr=cfg.lr)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as greenrun.ckpt loads optimizer.pt

    resumed = fresh()
    resumed.load_state_dict(saved["model"])
    opt2 = optimizer.build(cfg, resumed)
    opt2.load_state_dict(saved["optimizer"])
    assert train(resumed, opt2, 3, lr=cfg.lr, first=3) == train(net, opt, 3, lr=cfg.lr, first=3)
    for a, b in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["adamw8bit", "muon", "lion", "adafactor"])
def test_each_optimizer_trains_and_resumes_on_cuda_in_fp16(name, tiny, tmp_path):
    """GradScaler's unscale_ and step on a real GPU, and the state through a checkpoint (8-bit moments are
    tensor subclasses); CUDA's atomics make the resumed losses close rather than bit-equal."""
    if optimizer.device_problems(OptimizerConfig(name=name), torch.device("cuda")):
        pytest.skip("; ".join(optimizer.device_problems(OptimizerConfig(name=name), torch.device("cuda"))))
    args = [
        *tiny,
        *STEPS,
        f"optimizer={name}",
        "precision=fp16",
        "trainer.device=cuda",
        "trainer.compile=false",
    ]
    straight, sliced = straight_and_sliced(args, tmp_path)
    a, b = run_losses(straight), run_losses(sliced)
    assert a[20] < a[1], a
    assert all(abs(a[s] - b[s]) < 1e-3 for s in range(11, 21)), (a, b)


def test_adamw_decays_the_linear_weights_only():
    net = fresh()
    decay, rest = optimizer.build(OptimizerConfig(), net).param_groups
    names = {id(p): name for name, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert decayed == {
        n for n, p in net.named_parameters() if n.startswith("h.") and n.endswith("weight") and p.dim() == 2
    }
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.attn.c_attn.bias"} <= {
        names[id(p)] for p in rest["params"]
    }


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    net = fresh()
    fp8.tie_head(net)  # precision=fp8 with fp8.lm_head: a linear over the token embedding, still AdamW's
    opt = optimizer.build(shipped("muon", muon_lr_scale=0.5, lr=1e-3), net)
    assert isinstance(opt, MuonWithAdamW)
    assert isinstance(opt.parts["muon"], torch.optim.Muon) and isinstance(
        opt.parts["adamw"], torch.optim.AdamW
    )
    names = {id(p): name for name, p in net.named_parameters()}  # the tied head under its first name, wte
    muon_group, adamw_group = opt.param_groups
    assert muon_group is opt.parts["muon"].param_groups[0]  # the trainer's group["lr"] reaches the part
    per_layer = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert [names[id(p)] for p in muon_group["params"]] == [f"h.{i}.{w}" for i in range(2) for w in per_layer]
    rest = {names[id(p)] for p in adamw_group["params"]}
    assert "wte.weight" in rest and "wpe.weight" in rest and "h.1.ln_2.bias" in rest
    assert len(muon_group["params"]) + len(adamw_group["params"]) == len(list(net.parameters()))
    assert (muon_group["lr_scale"], muon_group["lr"], muon_group["weight_decay"]) == (0.5, 5e-4, 0.1)
    assert (adamw_group["lr_scale"], adamw_group["lr"], adamw_group["weight_decay"]) == (1.0, 1e-3, 0.0)


def test_muon_wrapper_state_is_a_live_view_after_loading():
    net = fresh()
    opt = optimizer.build(shipped("muon"), net)
    train(net, opt, 1, lr=1e-3)
    state = copy.deepcopy(opt.state_dict())
    assert set(state) == {"muon", "adamw"}
    opt.load_state_dict(state)
    assert opt.param_groups == [g for part in opt.parts.values() for g in part.param_groups]
    assert all(opt.param_groups[i] is g for i, g in enumerate(opt.parts["muon"].param_groups))
    assert len(opt.state) == len(list(net.parameters()))
    assert "momentum_buffer" in opt.state[net.h[0].mlp.c_fc.weight] and "exp_avg" in opt.state[net.wte.weight]
    with pytest.raises(ValueError, match="expected"):
        opt.load_state_dict({"muon": state["muon"]})


def test_muon_wrapper_works_with_grad_scaler_and_clipping():
    """fp16 runs scaler.unscale_(opt), clip, scaler.step(opt): the wrapper must unscale every part's grads."""
    plain, scaled = fresh(), fresh()
    opt_plain = optimizer.build(shipped("muon"), plain)
    opt_scaled = optimizer.build(shipped("muon"), scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for net, opt, use in ((plain, opt_plain, False), (scaled, opt_scaled, True)):
        _, loss = net(DATA[:, :-1], DATA[:, 1:])
        (scaler.scale(loss) if use else loss).backward()
        if use:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt) if use else opt.step()
        opt.zero_grad()
    scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)  # a power-of-two scale unscales exactly
    assert not torch.equal(plain.h[0].mlp.c_fc.weight, fresh().h[0].mlp.c_fc.weight)

    before = [p.detach().clone() for p in scaled.parameters()]
    _, loss = scaled(DATA[:, :-1], DATA[:, 1:])
    scaler.scale(loss).backward()
    scaled.wte.weight.grad[0, 0] = float("inf")  # an overflow in the AdamW part: neither part may step
    scaler.step(opt_scaled)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**9


def test_lion_is_the_sign_of_the_blend_with_decoupled_decay():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.zeros(3)
    expected = p.detach().clone()
    for g in (torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, 0.2, 0.4])):
        p.grad = g.clone()
        opt.step()
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        assert torch.allclose(p.detach(), expected, atol=1e-7)
        assert torch.allclose(opt.state[p]["exp_avg"], m, atol=1e-7)
    with pytest.raises(ValueError, match="Lion"):
        Lion([p], lr=0.1, betas=(0.9, 1.0))


def test_adamw8bit_on_a_cpu_is_one_clear_problem_naming_adafactor():
    cfg = OptimizerConfig(name="adamw8bit")
    (problem,) = optimizer.device_problems(cfg, CPU)
    assert (
        problem.startswith("optimizer=adamw8bit") and "CUDA" in problem and "optimizer=adafactor" in problem
    )
    assert all(optimizer.device_problems(OptimizerConfig(name=n), CPU) == [] for n in ON_CPU)
    assert optimizer.device_problems(OptimizerConfig(name="adamx"), CPU) == []  # validate() names that one
    with pytest.raises(RuntimeError, match="optimizer=adafactor"):
        optimizer.build(cfg, fresh())
    # The smoke test's CPU steps build the same maths in full precision instead.
    assert OPTIMIZERS.get("adamw8bit").cpu_stand_in == "adamw"
    assert all(OPTIMIZERS.get(n).cpu_stand_in is None for n in ON_CPU)


def test_validate_names_every_bad_value():
    bad = OptimizerConfig(
        lr=0, beta2=1.0, clip_threshold=0.5, beta2_decay=0.2, muon_ns_steps=0, muon_adjust_lr="rms"
    )
    problems = optimizer.validate(bad)
    for key in ("lr", "beta2", "clip_threshold", "beta2_decay", "muon_ns_steps", "muon_adjust_lr"):
        assert any(p.startswith(f"optimizer.{key}:") for p in problems), key
    assert problems[-1].endswith("unknown value 'rms'; choose one of match_rms_adamw, original")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw8bit_on_cuda_learns_counts_and_resumes():
    device = torch.device("cuda")
    if optimizer.device_problems(OptimizerConfig(name="adamw8bit"), device):
        pytest.skip("; ".join(optimizer.device_problems(OptimizerConfig(name="adamw8bit"), device)))
    cfg, model = shipped("adamw8bit"), ModelConfig(n_layer=2, n_embd=64, n_head=2, seq_len=16, vocab_size=64)
    net = fresh(model, device)
    opt = optimizer.build(cfg, net)
    losses = train(net, opt, 20, lr=cfg.lr)
    assert losses[-1] < losses[0] - 0.3, losses
    assert OPTIMIZERS.get("adamw8bit").state_bytes(net) == state_bytes(opt)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location=device)
    resumed = fresh(model, device)
    resumed.load_state_dict(saved["model"])
    opt2 = optimizer.build(cfg, resumed)
    opt2.load_state_dict(saved["optimizer"])
    assert type(opt2.state[resumed.h[0].mlp.c_fc.weight]["exp_avg"]) is not torch.Tensor  # still 8-bit
    after, straight = train(resumed, opt2, 3, lr=cfg.lr, first=20), train(net, opt, 3, lr=cfg.lr, first=20)
    assert after == pytest.approx(straight, abs=1e-4)  # CUDA's embedding backward adds atomically
