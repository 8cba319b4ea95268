"""The CUDA-graph step keeps every .grad allocated and trains exactly as the plain step does.

CUDA graphs themselves need a GPU (docs/benchmarks.md has the H200 rows); what runs here is the trainer's side
of the contract: grads allocated before the first micro-step and zeroed, not freed, after the optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from greenrun import config
from greenrun.runtime import distributed
from greenrun.trainer import Trainer

CPU = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _trainer(tiny: list[str], run_dir: Path, graphs: bool) -> Trainer:
    cfg = config.apply_overrides(
        config.Config(), [*tiny, "trainer.max_steps=4", "trainer.grad_accum_steps=3", f"run.dir={run_dir}"]
    )
    trainer = Trainer(cfg, run_dir, dist=CPU)
    trainer.cuda_graphs = graphs  # what compile_mode=reduce-overhead sets on a CUDA device
    return trainer


def test_graph_step_keeps_grads_and_matches_the_plain_step(tiny: list[str], tmp_path: Path) -> None:
    plain, graphs = _trainer(tiny, tmp_path / "a", False), _trainer(tiny, tmp_path / "b", True)
    try:
        for _ in range(3):
            a, b = plain.train_step(), graphs.train_step()
            assert a == b  # bit-identical losses, lrs and gradient norms
            assert all(p.grad is None for p in plain.model.parameters())
            kept = [p.grad for p in graphs.model.parameters()]
            assert all(g is not None and not g.any() for g in kept)  # allocated, zeroed for the next step
        for pa, pb in zip(plain.model.parameters(), graphs.model.parameters(), strict=True):
            assert torch.equal(pa, pb)
    finally:
        plain.close()
        graphs.close()


def test_every_compile_mode_is_a_valid_choice() -> None:
    for mode in config.COMPILE_MODES:
        cfg = config.apply_overrides(config.Config(), [f"trainer.compile_mode={mode}"])
        assert cfg.trainer.compile_mode == mode
    assert set(config.CUDA_GRAPH_MODES) <= set(config.COMPILE_MODES)
