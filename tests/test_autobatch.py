"""trainer.micro_batch_size=auto: global-batch arithmetic, the OOM probe, margins, and real CPU steps.

No GPU is needed: out-of-memory is simulated by raising torch.OutOfMemoryError above a hidden
micro-batch threshold, which is exactly what the probe sees from a CUDA allocator.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from greenrun.train import autobatch, memory, model, optimizer
from greenrun.train.autobatch import auto_micro_batch, cpu_fallback, global_batch_plan, probe, with_margin


def oom_above(threshold: int, calls: list[int] | None = None):
    """A step_fn that fits up to ``threshold`` sequences and runs out of memory above it."""

    def step(mb: int) -> None:
        if calls is not None:
            calls.append(mb)
        if mb > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake): micro-batch {mb} > {threshold}")

    return step


# --- global_batch_plan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, micro, seq, world, expected",
    [
        (32 * 1024, 8, 1024, 1, (8, 4, 32 * 1024)),  # already exact
        (32 * 1024, 12, 1024, 1, (8, 4, 32 * 1024)),  # 12 x 3 overshoots: lowered to the exact 8 x 4
        (60 * 8 * 1024, 16, 1024, 8, (15, 4, 60 * 8 * 1024)),  # 8 ranks, 60 rows each: 15 x 4
        (64 * 2 * 512, 48, 512, 2, (32, 2, 64 * 2 * 512)),  # 2 ranks: 48 x 2 overshoots, 32 x 2 exact
        (4096, 100, 256, 1, (16, 1, 4096)),  # micro larger than needed: no accumulation
        (37 * 64, 40, 64, 1, (37, 1, 37 * 64)),  # a prime number of rows that fits in one micro-step
        (37 * 64, 1, 64, 1, (1, 37, 37 * 64)),  # micro-batch 1: every row is its own micro-step
        (100, 8, 256, 2, (1, 1, 512)),  # less than one sequence per rank: the smallest possible step
    ],
)
def test_global_batch_plan_cases(target, micro, seq, world, expected):
    assert global_batch_plan(target, micro, seq, world) == expected


def test_prime_rows_prefer_a_close_inexact_split_over_micro_batch_one():
    # 37 rows with room for 16: the only exact split is 1 x 37, so 12 x 3 = 36 rows (-2.7%) is taken.
    assert global_batch_plan(37 * 64, 16, 64, 1) == (12, 3, 36 * 64)
    # 62 rows = 2 x 31, room for 16: 4 micro-steps of 15 or 16 are 2 rows off either way; the tie goes up.
    assert global_batch_plan(62 * 64, 16, 64, 1) == (16, 4, 64 * 64)


def test_target_not_a_multiple_of_one_row():
    # 5.5 sequences per rank: 5 and 6 are equally far, and the larger one wins the tie.
    assert global_batch_plan(1100, 8, 100, 2) == (6, 1, 1200)
    assert global_batch_plan(1000 + 150, 8, 100, 2) == (6, 1, 1200)  # 5.75 rows: 6 is closer


def test_global_batch_plan_invariants_over_a_grid():
    for world in (1, 2, 8):
        for seq in (1, 7, 64):
            row = seq * world
            for rows in range(1, 130):
                for extra in (0, seq // 2):  # whole rows, and targets between rows
                    target = rows * row + extra * world
                    for micro in (1, 2, 3, 5, 8, 13, 16, 37, 64, 200):
                        m, accum, tokens = global_batch_plan(target, micro, seq, world)
                        assert 1 <= m <= micro and accum >= 1 and tokens == m * accum * row
                        divisors = [d for d in range(1, micro + 1) if target % row == 0 and rows % d == 0]
                        if tokens == target:
                            assert m == max(divisors)  # the largest exact micro-batch that fits
                            continue
                        # Inexact: the first accum that fits, the nearest micro-batch for it, and no exact
                        # split that would keep at least half of that micro-batch.
                        assert accum == math.ceil(target / (micro * row))
                        assert abs(tokens - target) <= accum * row / 2
                        assert all(2 * d < m for d in divisors)


def test_global_batch_plan_rejects_nonpositive_arguments():
    with pytest.raises(ValueError):
        global_batch_plan(0, 8, 1024, 1)
    with pytest.raises(ValueError):
        global_batch_plan(1024, 0, 1024, 1)


# --- probe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 37, 64, 100, 511])
@pytest.mark.parametrize("start", [1, 8, 300])
def test_probe_finds_the_threshold_within_an_eighth_and_never_above(threshold, start):
    calls: list[int] = []
    result = probe(oom_above(threshold, calls), start=start, limit=1024, cleanup=lambda: None)
    assert result.best <= threshold
    assert threshold - result.best <= 0.125 * threshold
    assert [p.micro_batch for p in result.probes] == calls
    assert all(p.ok == (p.micro_batch <= threshold) for p in result.probes)
    assert result.stopped == "converged"


def test_probe_guarantee_holds_for_every_threshold():
    for threshold in range(1, 400):
        for start in (1, 3, 16, 64):
            result = probe(oom_above(threshold), start=start, limit=1024, cleanup=lambda: None)
            assert threshold / 1.125 <= result.best <= threshold, (threshold, start)
            assert len(result.probes) <= 16


def test_probe_stops_at_the_limit_when_everything_fits():
    result = probe(oom_above(10_000), start=1, limit=48, cleanup=lambda: None)
    assert (result.best, result.stopped) == (48, "limit")
    assert [p.micro_batch for p in result.probes] == [1, 2, 4, 8, 16, 32, 48]


def test_probe_returns_zero_when_nothing_fits():
    result = probe(oom_above(0), start=16, limit=64, cleanup=lambda: None)
    assert result.best == 0
    assert [p.micro_batch for p in result.probes] == [16, 8, 4, 2, 1]


def test_probe_counts_runtime_errors_mentioning_out_of_memory():
    def step(mb: int) -> None:
        if mb > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert probe(step, start=1, limit=64, cleanup=lambda: None).best == 5


@pytest.mark.parametrize(
    "error",
    [ValueError("bad shape"), RuntimeError("CUDA error: an illegal memory access"), KeyboardInterrupt()],
)
def test_probe_never_swallows_other_exceptions(error):
    def step(mb: int) -> None:
        if mb >= 4:
            raise error

    with pytest.raises(type(error)):
        probe(step, start=1, limit=64, cleanup=lambda: None)


def test_cleanup_runs_after_each_failure_once_the_failed_step_is_released():
    events: list[str] = []
    alive: list[weakref.ref] = []

    class Activations:  # stands in for the tensors a failed forward pass was holding
        pass

    def step(mb: int) -> None:
        activations = Activations()
        alive.append(weakref.ref(activations))
        events.append(f"step {mb}")
        if mb > 20:
            raise torch.OutOfMemoryError("fake")

    def cleanup() -> None:
        assert alive[-1]() is None, "the failed step's frame (and its memory) must be gone before cleanup"
        events.append("cleanup")

    result = probe(step, start=1, limit=1024, cleanup=cleanup)
    failures = [p.micro_batch for p in result.probes if not p.ok]
    assert failures and events.count("cleanup") == len(failures)
    for mb in failures:
        assert events[events.index(f"step {mb}") + 1] == "cleanup"


def test_probe_respects_the_time_budget_with_a_fake_clock():
    now = [0.0]

    def slow_step(mb: int) -> None:
        now[0] += 10.0  # every probe takes 10 s
        oom_above(1000)(mb)

    result = probe(slow_step, start=1, limit=4096, max_seconds=25, clock=lambda: now[0], cleanup=lambda: None)
    # Probes start at t=0, 10 and 20; at t=30 the budget is spent and the best so far comes back.
    assert [p.micro_batch for p in result.probes] == [1, 2, 4]
    assert (result.best, result.stopped, result.seconds) == (4, "time budget", 30.0)
    assert all(p.seconds == 10.0 and p.peak_bytes is None for p in result.probes)


def test_time_budget_does_not_stop_before_anything_fits():
    now = [0.0]

    def slow_step(mb: int) -> None:
        now[0] += 100.0
        oom_above(3)(mb)

    result = probe(slow_step, start=64, limit=64, max_seconds=1, clock=lambda: now[0], cleanup=lambda: None)
    assert result.best == 2 and result.stopped == "time budget"  # 64, 32, 16, 8, 4 fail; 2 fits


def test_probe_cap_bounds_the_number_of_steps():
    result = probe(oom_above(700), start=1, limit=1024, max_probes=5, cleanup=lambda: None)
    assert (len(result.probes), result.best, result.stopped) == (5, 16, "probe cap")


# --- margin and CPU fallback ------------------------------------------------------------------------


def test_with_margin():
    assert [with_margin(mb) for mb in (1, 2, 10, 30, 100, 1000)] == [1, 1, 9, 27, 90, 900]
    assert with_margin(64, 0.5) == 32 and with_margin(7, 1.0) == 7
    with pytest.raises(ValueError):
        with_margin(10, 0.0)


def test_cpu_fallback_fits_the_estimate_in_half_the_ram():
    def estimate(mb: int) -> int:
        return 1000 + 100 * mb

    assert cpu_fallback(estimate, limit=1000, available_bytes=2 * 3000)[0] == 20  # 1000 + 2000 <= 3000
    assert cpu_fallback(estimate, limit=1000, available_bytes=10**12)[0] == autobatch.CPU_CAP
    assert cpu_fallback(estimate, limit=12, available_bytes=10**12)[0] == 12
    assert cpu_fallback(estimate, limit=1000, available_bytes=100)[0] == 1  # nothing fits: still train
    assert cpu_fallback(None, limit=1000)[0] == autobatch.CPU_DEFAULT


# --- auto_micro_batch ---------------------------------------------------------------------------------

TINY = model.ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=16, vocab_size=128)


def tiny_steps(oom_above_mb: int) -> autobatch.ThrowawaySteps:
    """Real tiny-GPT training steps that 'run out of memory' inside the forward pass above a micro-batch."""

    def build():
        gpt = model.GPT(TINY)

        def fake_allocator_limit(module, inputs, output):
            if output.shape[0] > oom_above_mb:
                raise torch.OutOfMemoryError(f"CUDA out of memory (fake): batch {output.shape[0]}")

        gpt.h[-1].register_forward_hook(fake_allocator_limit)
        return gpt, optimizer.build(optimizer.OptimizerConfig(), gpt)

    return autobatch.ThrowawaySteps(build, TINY.vocab_size, TINY.seq_len, torch.device("cpu"))


def test_auto_micro_batch_runs_real_steps_and_keeps_the_global_batch():
    steps, lines = tiny_steps(oom_above_mb=21), []
    rng_before = torch.get_rng_state()
    target = 64 * TINY.seq_len  # 64 sequences per optimizer step on one device
    plan = auto_micro_batch(steps, TINY.seq_len, target, 1, "cpu", lines.append, probe_cpu=True)

    # Probes 1..16 fit, 32 and 24 do not, 20 fits, 22 does not: 20 x 0.9 = 18, down to 16 for tensor cores.
    assert [(p.micro_batch, p.ok) for p in plan.probes][-4:] == [
        (32, False),
        (24, False),
        (20, True),
        (22, False),
    ]
    assert (plan.micro_batch, plan.grad_accum_steps, plan.tokens_per_step) == (16, 4, target)
    assert steps.steps_run == sum(p.ok for p in plan.probes)  # every successful probe was a whole step
    gpt, _ = steps.parts
    assert all(p.grad is None for p in gpt.parameters())  # failed steps left no gradients behind
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's own RNG stream is untouched
    init = model.GPT(TINY)  # what build() started from, since the probe forks the RNG around it
    assert not torch.equal(gpt.h[0].mlp.c_fc.weight, init.h[0].mlp.c_fc.weight)  # the optimizer stepped
    assert lines == [f"auto micro-batch: {plan.note}"] and "+0.00% vs target" in plan.note
    steps.close()
    assert steps.parts is None


def test_auto_micro_batch_keeps_a_single_micro_step_when_it_fits_with_margin():
    steps = tiny_steps(oom_above_mb=1000)
    plan = auto_micro_batch(steps, TINY.seq_len, 12 * TINY.seq_len, 1, "cpu", lambda s: None, probe_cpu=True)
    # The probe goes up to ceil(12 / 0.9) = 14, so the margin still leaves all 12 rows in one step.
    assert plan.probes[-1].micro_batch == 14
    assert (plan.micro_batch, plan.grad_accum_steps) == (12, 1)


def test_auto_micro_batch_uses_the_rank_agreement():
    plan = auto_micro_batch(
        lambda mb: lambda: oom_above(500)(mb),
        8,
        8 * 1000,
        1,
        "cpu",
        lambda s: None,
        probe_cpu=True,
        agree=lambda mb: 10,
    )
    assert plan.micro_batch == 8 and plan.grad_accum_steps == 125  # 10 x 0.9 = 9; 1000 = 8 x 125 is exact


def test_auto_micro_batch_fails_clearly_when_nothing_fits():
    with pytest.raises(RuntimeError, match="even micro-batch 1"):
        auto_micro_batch(lambda mb: lambda: oom_above(0)(mb), 8, 64, 1, "cpu", lambda s: None, probe_cpu=True)


def test_auto_micro_batch_on_cpu_uses_the_estimate_and_never_probes():
    def make_step(mb: int):
        raise AssertionError("CPU must not probe")

    def estimate(mb: int) -> int:
        return memory.estimate(TINY, mb, TINY.seq_len, "fp32", ["none"] * TINY.n_layer).total

    plan = auto_micro_batch(
        make_step, TINY.seq_len, 256 * TINY.seq_len, 1, "cpu", lambda s: None, estimate_bytes=estimate
    )
    assert plan.probes == [] and plan.note.startswith("cpu: estimate fits")
    assert (plan.micro_batch, plan.grad_accum_steps) == (64, 4)  # the tiny model fits the CPU cap of 64
