"""How long the training loop blocks per checkpoint snapshot: fresh pageable copies vs checkpoint.Stager.

    python3 scripts/bench_staging.py --out $OUT/staging.json                  # GPT-2 124M on the GPU
    python3 scripts/bench_staging.py --model tiny --out /tmp/staging.json     # a quick check, CPU too

The model, on CUDA when there is one, gets one step of a fused AdamW so that its moments exist (the full 3x
parameters of state). Then --saves consecutive snapshots each, every one bracketed by torch.cuda.synchronize():
  old               fresh pageable copies (to_cpu, as Trainer.snapshot took them before the Stager)
  stager_lazy       a new Stager: the first save allocates (and pins) the buffers, later ones reuse them
  stager_reserved   a new Stager after reserve() (its time is reserve_s): the first save reuses too
  stager_busy_s     one Stager snapshot while the previous one is alive (a preemption during a write)
and the blocking part of the real pipeline.Checkpointer.save (checkpointer_old, checkpointer_stager), each
save's background commit finished before the next. Issue 10's target: <= 0.3 s per save on an H200.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from greenrun.ckpt import checkpoint
from greenrun.ckpt.checkpoint import CheckpointConfig, Snapshot
from greenrun.ckpt.pipeline import Checkpointer
from greenrun.train import model

CUDA = torch.cuda.is_available()
sync = torch.cuda.synchronize if CUDA else lambda: None
META = {"config_hash": "bench", "world_size": 1, "data_cache_key": "", "val_loss": None}


def old_to_cpu(obj: Any) -> Any:
    """checkpoint.to_cpu as Trainer.snapshot used it before staging: a fresh pageable copy every save."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: old_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(old_to_cpu(v) for v in obj)
    return obj


def build(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = model.GPT(model.preset(name)).to("cuda" if CUDA else "cpu")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=CUDA)
    x = torch.randint(0, m.cfg.vocab_size, (1, 64), device=next(m.parameters()).device)
    _, loss = m(x, x)
    loss.backward()
    opt.step()  # exp_avg and exp_avg_sq now exist for every parameter
    opt.zero_grad(set_to_none=True)
    return m, opt


def state(m: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict, dict, dict]:
    """(unique model tensors, aliases, optimizer, trainer) as Trainer.snapshot gathers them."""
    unique, aliases = checkpoint.unique_tensors(m.state_dict())
    rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if CUDA:
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return unique, aliases, opt.state_dict(), {"step": 1, "first_val": None, "scaler": {}, "rng": rng}


def snapshot(
    m: torch.nn.Module, opt: torch.optim.Optimizer, stager: checkpoint.Stager | None = None
) -> Snapshot:
    """Trainer.snapshot's copy: through `stager`, or with fresh pageable copies as before it (stager None)."""
    unique, aliases, optim, trainer = state(m, opt)
    if stager is not None:
        return stager.snapshot(1, unique, aliases, optim, trainer, META)
    return Snapshot(1, old_to_cpu(unique), aliases, old_to_cpu(optim), old_to_cpu(trainer), META)


def timed(fn: Any) -> float:
    sync()
    t0 = time.perf_counter()
    fn()  # the snapshot is dropped on return, as its writer drops it: the next one may reuse the buffers
    sync()
    return time.perf_counter() - t0


def summary(blocked: list[float]) -> dict:
    later = statistics.median(blocked[1:]) if len(blocked) > 1 else None
    return {"blocked_s": blocked, "first_s": blocked[0], "later_median_s": later}


def fresh_pinned_pool() -> None:
    """Hand the pinned blocks of an earlier stager back, so that a new one pays for its allocation again."""
    if CUDA and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def through_checkpointer(snapshot_fn: Any, saves: int, root: Path) -> dict:
    saver = Checkpointer(CheckpointConfig(keep_last=2), root)
    for _ in range(saves):
        sync()
        saver.save(snapshot_fn)
        saver._join()  # the commit finishes before the next save: the stall measured is the snapshot's alone
    saver.close()
    return summary(saver.blocked_s)


def stager_series(m: torch.nn.Module, opt: torch.optim.Optimizer, saves: int) -> dict:
    lazy = checkpoint.Stager()
    out = {"stager_lazy": summary([timed(lambda: snapshot(m, opt, lazy)) for _ in range(saves)])}
    out["state_bytes"], out["pinned_bytes"] = lazy.nbytes, lazy.pinned_bytes
    lazy = None
    fresh_pinned_pool()
    reserved = checkpoint.Stager()
    unique, _, optim, trainer = state(m, opt)
    reserve_s = timed(lambda: reserved.reserve(unique, optim, trainer))
    blocked = [timed(lambda: snapshot(m, opt, reserved)) for _ in range(saves)]
    out["stager_reserved"] = {"reserve_s": reserve_s, **summary(blocked), "reused": reserved.reused}
    if CUDA and hasattr(torch.cuda, "host_memory_stats"):
        stats = torch.cuda.host_memory_stats()  # the allocator rounds each pinned block up to a power of two
        out["pinned_allocator_bytes"] = stats.get("allocated_bytes.current")
        out["pinned_alloc_time_s"] = stats.get("host_alloc_time.total", 0) / 1e6
    held = snapshot(m, opt, reserved)  # in the buffers, and alive: as while its write is still running
    out["stager_busy_s"] = timed(lambda: snapshot(m, opt, reserved))
    live, _, live_optim, _ = state(m, opt)
    moments = [
        (t, live_optim["state"][i][k]) for i, s in held.optimizer["state"].items() for k, t in s.items()
    ]
    pairs = [(t, live[k]) for k, t in held.model.items()] + moments
    out["consistent"] = all(torch.equal(staged, t.cpu()) for staged, t in pairs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="gpt2", help="model preset: gpt2 (124M) | tiny | ...")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="where the Checkpointer writes (a temp dir)")
    args = ap.parse_args()
    m, opt = build(args.model)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "parameters": sum(p.numel() for p in m.parameters()),
        "saves": args.saves,
        "target_s": 0.3,
    }
    out["old"] = summary([timed(lambda: snapshot(m, opt)) for _ in range(args.saves)])
    out.update(stager_series(m, opt, args.saves))
    fresh_pinned_pool()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        out["checkpointer_old"] = through_checkpointer(lambda: snapshot(m, opt), args.saves, Path(work) / "a")
        stager = checkpoint.Stager()  # lazy, as the Trainer's: its first save allocates
        out["checkpointer_stager"] = through_checkpointer(
            lambda: snapshot(m, opt, stager), args.saves, Path(work) / "b"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
