"""The non-finite guard: a NaN or inf step is caught before its update, on every rank alike, and never saved."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from greenrun import config
from greenrun.ckpt import checkpoint
from greenrun.train import early_stopping
from greenrun.train.early_stopping import MAX_SKIPS_IN_A_ROW, NonFiniteError, NonFiniteGuard
from greenrun.trainer import Trainer
from tests.common import run_cli

NAN, INF = float("nan"), float("inf")


def check(guard, loss, norm=1.0, **kw):
    return guard.check(7, torch.tensor(loss), torch.tensor(norm), **kw)


# --- the guard ---------------------------------------------------------------------------------------------


def test_a_finite_step_is_applied():
    assert check(NonFiniteGuard("stop"), 2.5, 0.5) == (True, 2.5, 0.5)


@pytest.mark.parametrize("loss, norm", [(NAN, 1.0), (INF, 1.0), (2.0, NAN), (2.0, INF)])
def test_stop_raises_naming_the_step_the_values_and_the_levers(loss, norm):
    with pytest.raises(NonFiniteError) as e:
        check(NonFiniteGuard("stop"), loss, norm)
    message = str(e.value)
    assert message.startswith("step 7: loss ") and f"gradient norm {norm}" in message
    assert "optimizer.lr" in message and "precision=bf16" in message and "on_nonfinite=skip" in message


def test_skip_drops_the_update_counts_and_warns(caplog):
    guard = NonFiniteGuard("skip")
    with caplog.at_level(logging.WARNING):
        assert check(guard, NAN)[0] is False
        assert check(guard, 2.0, INF)[0] is False
    assert check(guard, 2.0)[0] is True
    assert guard.state_dict() == {"skipped": 2, "in_a_row": 0}
    assert "step 7: loss nan" in caplog.text and "2 step(s) skipped in this run" in caplog.text


def test_skip_gives_up_after_too_many_in_a_row():
    guard = NonFiniteGuard("skip")
    for _ in range(MAX_SKIPS_IN_A_ROW - 1):
        assert check(guard, NAN)[0] is False
    with pytest.raises(NonFiniteError, match=f"{MAX_SKIPS_IN_A_ROW} non-finite steps in a row"):
        check(guard, NAN)


def test_under_a_loss_scaler_an_inf_gradient_is_the_scalers_to_skip():
    assert check(NonFiniteGuard("stop"), 2.0, INF, check_norm=False)[0] is True
    with pytest.raises(NonFiniteError):  # a non-finite loss is a failure in any precision
        check(NonFiniteGuard("stop"), NAN, 1.0, check_norm=False)


def test_the_count_resumes_with_the_checkpoint():
    guard = NonFiniteGuard("skip")
    guard.load_state_dict({"skipped": 3, "in_a_row": 1})
    check(guard, NAN)
    assert guard.state_dict() == {"skipped": 4, "in_a_row": 2}


def test_all_finite_looks_at_floating_point_tensors():
    assert early_stopping.all_finite([torch.ones(3), torch.tensor([1, 2])])
    assert not early_stopping.all_finite([torch.ones(3), torch.tensor([1.0, INF])])
    assert not early_stopping.all_finite([torch.tensor([NAN], dtype=torch.bfloat16)])


def _rank(rank: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        for mode in ("skip", "stop"):
            loss = torch.tensor(NAN if rank == 1 else 2.0)  # only the second rank went wrong
            try:
                out[rank, mode] = NonFiniteGuard(mode).check(3, loss, torch.tensor(1.0))[0]
            except NonFiniteError:
                out[rank, mode] = "raised"
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_the_same_branch(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    assert dict(out) == {(r, "skip"): False for r in (0, 1)} | {(r, "stop"): "raised" for r in (0, 1)}


# --- in a Trainer ------------------------------------------------------------------------------------------


def _trainer(tiny, run_dir, *extra):
    cfg = config.apply_overrides(
        config.Config(), [*tiny, "trainer.max_steps=6", f"run.dir={run_dir}", *extra]
    )
    return Trainer(cfg, run_dir)


def _poison(trainer, at_step):
    """The training loss of optimizer step `at_step` (1-based) becomes NaN; evaluations stay untouched."""
    forward = trainer.model.forward

    def poisoned(x, y=None):
        logits, loss = forward(x, y)
        if torch.is_grad_enabled() and trainer.step + 1 == at_step:
            loss = loss * NAN
        return logits, loss

    trainer.model.forward = poisoned


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_skip_leaves_weights_and_optimizer_alone_and_trains_on(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "trainer.on_nonfinite=skip")
    try:
        _poison(trainer, at_step=3)
        trainer.train_step(), trainer.train_step()
        before, moments = _params(trainer), trainer.optimizer.state_dict()["state"]
        moments = {k: {n: t.clone() for n, t in s.items()} for k, s in moments.items()}
        stats = trainer.train_step()
        assert trainer.step == 3 and stats["loss"] != stats["loss"]  # counted, logged as NaN
        after = _params(trainer)
        assert all(torch.equal(before[k], after[k]) for k in before)
        for k, s in trainer.optimizer.state_dict()["state"].items():
            assert all(torch.equal(t, moments[k][n]) for n, t in s.items())  # AdamW's step count too
        trainer.train_step()
        assert not all(torch.equal(after[k], v) for k, v in _params(trainer).items())
        result = trainer.train()
    finally:
        trainer.close()
    assert result["finished"] and result["step"] == 6 and result["skipped_steps"] == 1


def test_stop_raises_before_the_update_and_no_checkpoint_holds_it(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "checkpoint.interval=1", "checkpoint.keep_last=10")
    try:
        _poison(trainer, at_step=4)
        with pytest.raises(NonFiniteError, match="step 4: loss nan"):
            trainer.train()
        assert trainer.step == 3  # the poisoned step was not taken
    finally:
        trainer.close()
    assert [p.name for p in checkpoint.committed(tmp_path / "checkpoints")][0] == "step-00000003"


def test_an_inf_gradient_stops_fp32_but_is_skipped_by_fp16s_scaler(tiny, tmp_path):
    def inf_grads(trainer):
        p = next(trainer.model.parameters())
        p.register_hook(lambda g: torch.full_like(g, INF))

    trainer = _trainer(tiny, tmp_path / "fp32")
    try:
        inf_grads(trainer)
        with pytest.raises(NonFiniteError, match="gradient norm inf"):
            trainer.train_step()
    finally:
        trainer.close()
    trainer = _trainer(tiny, tmp_path / "fp16", "precision=fp16")
    try:
        assert trainer.scaler.is_enabled()
        inf_grads(trainer)
        before, scale = _params(trainer), trainer.scaler.get_scale()
        trainer.train_step()  # no error: the scaler skips the step and halves its scale
        assert trainer.scaler.get_scale() < scale and trainer.guard.skipped == 0
        assert all(torch.equal(before[k], v) for k, v in _params(trainer).items())
    finally:
        trainer.close()


def _deferred(tiny, run_dir, *extra):
    trainer = _trainer(tiny, run_dir, "optimizer.fused=true", *extra)  # the fused kernel runs on a CPU too
    assert trainer.skips_on_device
    return trainer


def test_on_the_device_a_dropped_update_equals_one_the_host_skipped(tiny, tmp_path):
    """found_inf in fused AdamW's kernel, read at the end, leaves what a host-side skip leaves, bit for bit."""
    states = []
    for name, on_device in (("host", False), ("device", True)):
        trainer = _deferred(tiny, tmp_path / name, "trainer.on_nonfinite=skip")
        trainer.skips_on_device = on_device
        try:
            _poison(trainer, at_step=3)
            quiet = [trainer.train_step(sync=False) for _ in range(5)]
            assert all("loss" not in s for s in quiet)
            assert trainer.guard.skipped == (0 if on_device else 1)  # on the device: not read yet
            last = trainer.train_step()
            assert last["loss"] == last["loss"] and trainer.guard.skipped == 1
            states.append((_params(trainer), trainer.optimizer.state_dict()["state"]))
        finally:
            trainer.close()
    (host, host_moments), (device, device_moments) = states
    assert all(torch.equal(host[k], device[k]) for k in host)
    for k, s in host_moments.items():
        assert all(torch.equal(t, device_moments[k][n]) for n, t in s.items())  # step counts included


def test_on_the_device_stop_raises_at_the_next_log_line_and_no_checkpoint_holds_it(tiny, tmp_path):
    trainer = _deferred(tiny, tmp_path, "trainer.log_interval=5", "trainer.eval_interval=100")
    try:
        _poison(trainer, at_step=2)
        with pytest.raises(NonFiniteError, match=r"step 2: loss nan.*stopped 3 step\(s\) later"):
            trainer.train()
        assert trainer.step == 5
    finally:
        trainer.close()
    assert checkpoint.committed(tmp_path / "checkpoints") == []


def test_a_checkpoint_settles_the_pending_checks_first(tiny, tmp_path):
    trainer = _deferred(tiny, tmp_path, "trainer.on_nonfinite=skip")
    try:
        _poison(trainer, at_step=1)
        trainer.train_step(sync=False), trainer.train_step(sync=False)
        assert trainer.state_dict()["trainer"]["nonfinite"] == {"skipped": 1, "in_a_row": 0}
    finally:
        trainer.close()


# --- through the CLI ----------------------------------------------------------------------------------------

RUN = ["trainer.max_steps=10", "trainer.log_interval=1", "schedule.warmup_steps=0", "preflight=false"]
SAVE_EVERY_STEP = ["checkpoint.interval=1", "checkpoint.keep_last=10"]


def newest_is_finite(run_dir) -> bool:
    newest = checkpoint.latest_valid(run_dir / "checkpoints")
    if newest is None:
        return True
    model, optim, _, _ = checkpoint.load(newest)
    moments = [t for s in optim["state"].values() for t in s.values() if torch.is_tensor(t)]
    return early_stopping.all_finite([*model.values(), *moments])


def test_a_diverging_run_exits_1_with_one_message_and_a_finite_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "diverge"
    # lr 1e30: step 1's update leaves huge but finite weights; step 2's loss is NaN.
    r = run_cli("train", *tiny, *RUN, *SAVE_EVERY_STEP, "optimizer.lr=1e30", f"run.dir={run_dir}")
    assert r.returncode == 1
    assert "greenrun: step 2: loss nan" in r.stderr and "Lower optimizer.lr" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "GREENRUN_DEBUG" not in r.stderr  # one message, no hint
    assert [p.name for p in checkpoint.committed(run_dir / "checkpoints")] == ["step-00000001"]
    assert newest_is_finite(run_dir) and not (run_dir / "summary.json").exists()


def test_weights_that_overflowed_are_never_checkpointed(tiny, tmp_path):
    run_dir = tmp_path / "overflow"
    # lr inf: step 1's loss and gradients are finite, its update is not; the save at step 1 refuses it.
    r = run_cli("train", *tiny, *RUN, *SAVE_EVERY_STEP, "optimizer.lr=inf", f"run.dir={run_dir}")
    assert r.returncode == 1
    assert "the weights are not finite after step 1: not checkpointing them" in r.stderr
    assert checkpoint.committed(run_dir / "checkpoints") == [] and newest_is_finite(run_dir)


def test_on_nonfinite_is_validated():
    with pytest.raises(
        config.ConfigError, match="trainer.on_nonfinite: unknown value 'skpi'.*did you mean skip"
    ):
        config.validate(config.apply_overrides(config.Config(), ["trainer.on_nonfinite=skpi"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_fused_adamw_drops_the_update_without_a_host_sync(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "trainer.device=cuda", "trainer.on_nonfinite=skip", "precision=bf16")
    try:
        assert trainer.skips_on_device  # fused is the default on CUDA
        _poison(trainer, at_step=3)
        trainer.train_step(sync=False), trainer.train_step(sync=False)
        before = _params(trainer)
        trainer.train_step(sync=False)
        assert all(torch.equal(before[k], v) for k, v in _params(trainer).items())
        assert trainer.guard.skipped == 0  # not read yet
        last = trainer.train_step()
        assert trainer.guard.skipped == 1 and last["loss"] == last["loss"]
    finally:
        trainer.close()
