"""One-GPU benchmark of greenrun's compute and memory levers against the paths users would otherwise take.

    python3 scripts/bench_gpu.py --group a --out results/a.json   # HF baselines, greenrun fp32/bf16/compile, auto
    python3 scripts/bench_gpu.py --group b --out results/b.json   # checkpointing policies, fp8, fp8 loss curve

Every row runs in its own subprocess (fresh allocator, fresh peak-memory counters), GPT-2 124M at T=1024 unless
the row says otherwise, the same global batch (micro 16 x accum 4 x 1024 = 65,536 tokens per optimizer step).
Rows: tokens/s, MFU (6N + 12*L*H*Q*T FLOP per token against the device's dense bf16 peak), peak memory,
ms/step, J/token from NVML's energy counter, and for greenrun rows the predicted peak from `greenrun.train.memory`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_gpu")

REPO = Path(__file__).resolve().parents[1]
GLOBAL = {"micro": 16, "accum": 4, "seq": 1024}
WARMUP, TIMED = 3, 8

# name -> (kind, overrides or options)
ROWS = {
    "gr_chunk": ("gr", ["precision=bf16", "trainer.compile=true", "model.loss_chunk=4096"]),
    "gr_ckpt_full_chunk": (
        "gr",
        ["precision=bf16", "trainer.compile=true", "activation_checkpointing=full", "model.loss_chunk=4096"],
    ),
    "hf_fp32": ("hf", {"precision": "fp32", "compile": False}),
    "hf_bf16": ("hf", {"precision": "bf16", "compile": False}),
    "hf_bf16_compile": ("hf", {"precision": "bf16", "compile": True}),
    "gr_fp32": ("gr", ["precision=fp32", "trainer.compile=false"]),
    "gr_bf16": ("gr", ["precision=bf16", "trainer.compile=false"]),
    "gr_bf16_compile": ("gr", ["precision=bf16", "trainer.compile=true"]),
    "gr_ckpt_full": ("gr", ["precision=bf16", "trainer.compile=true", "activation_checkpointing=full"]),
    "gr_ckpt_every2": ("gr", ["precision=bf16", "trainer.compile=true", "activation_checkpointing=every_k"]),
    "gr_ckpt_sqrt": ("gr", ["precision=bf16", "trainer.compile=true", "activation_checkpointing=sqrt"]),
    "gr_ckpt_selective": (
        "gr",
        ["precision=bf16", "trainer.compile=true", "activation_checkpointing=selective"],
    ),
    "gr_fp8_gpt2": ("gr", ["precision=fp8"]),
    "gr_xl_bf16": (
        "gr",
        ["model=gpt2-xl", "precision=bf16", "trainer.compile=true", "trainer.micro_batch_size=4"],
    ),
    "gr_xl_fp8": ("gr", ["model=gpt2-xl", "precision=fp8", "trainer.micro_batch_size=4"]),
    "gr_wide_bf16": (
        "gr",
        [
            "model.n_embd=4096",
            "model.n_layer=4",
            "model.n_head=32",
            "precision=bf16",
            "trainer.compile=true",
            "trainer.micro_batch_size=8",
        ],
    ),
    "gr_wide_fp8": (
        "gr",
        [
            "model.n_embd=4096",
            "model.n_layer=4",
            "model.n_head=32",
            "precision=fp8",
            "trainer.micro_batch_size=8",
        ],
    ),
}
GROUPS = {
    "a": [
        "hf_fp32",
        "hf_bf16",
        "hf_bf16_compile",
        "gr_fp32",
        "gr_bf16",
        "gr_bf16_compile",
        "gr_ckpt_full",
        "auto",
    ],
    "b": [
        "gr_ckpt_every2",
        "gr_ckpt_sqrt",
        "gr_ckpt_selective",
        "gr_fp8_gpt2",
        "gr_wide_bf16",
        "gr_wide_fp8",
        "curve_wide_bf16",
        "curve_wide_fp8",
        "gr_xl_bf16",
        "gr_xl_fp8",
    ],
    "c": ["gr_chunk", "gr_ckpt_full_chunk", "profile_default", "gr_xl_bf16", "gr_xl_fp8"],
    "d": ["gr_chunk", "gr_ckpt_full_chunk"],
}
CURVE_STEPS = 200


def greenrun_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from greenrun import config
    from greenrun.core.shipped import conf_dir

    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        base = [
            "model=gpt2",
            f"trainer.micro_batch_size={GLOBAL['micro']}",
            f"trainer.grad_accum_steps={GLOBAL['accum']}",
            "trainer.device=cuda",
            "data.max_chars=0",
            "data.cache_dir=/tmp/greenrun-cache",
            "trainer.max_steps=1000",
            "schedule.warmup_steps=100",
        ]
        cfg = config.to_typed(compose(config_name="config", overrides=base + overrides))
    config.validate(cfg)
    return cfg


def timed_steps(step_fn, tokens_per_step: int, flops_per_token: float) -> dict:
    import torch

    from greenrun.runtime import energy, hardware

    for _ in range(WARMUP):
        step_fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    meter = energy.EnergyMeter(energy.EnergyConfig())
    meter.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED):
        step_fn()
    end.record()
    torch.cuda.synchronize()
    joules = meter.read()
    meter.close()
    seconds = start.elapsed_time(end) / 1000
    tps = TIMED * tokens_per_step / seconds
    peak = hardware.peak_bf16_flops(torch.device("cuda"))
    return {
        "tok_per_s": tps,
        "ms_per_step": 1000 * seconds / TIMED,
        "mfu": tps * flops_per_token / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "j_per_token": joules / (TIMED * tokens_per_step) if joules is not None else None,
        "energy_method": meter.method,
    }


def run_hf(opts: dict) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from greenrun.train import model as gmodel
    from greenrun.train import precision

    torch.backends.cuda.matmul.allow_tf32 = False  # the plain fp32 path a user gets without toggles
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(n_positions=GLOBAL["seq"])).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=6e-4, weight_decay=0.1)
    run = torch.compile(net) if opts["compile"] else net
    autocast = precision.get(opts["precision"]).autocast
    micro, accum, seq = GLOBAL["micro"], GLOBAL["accum"], GLOBAL["seq"]

    def step() -> None:
        for _ in range(accum):
            x = torch.randint(0, 50257, (micro, seq), device="cuda")
            with autocast(torch.device("cuda")):
                loss = run(input_ids=x, labels=x).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = gmodel.flops_per_token(
        gmodel.ModelConfig(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50257)
    )
    return timed_steps(step, micro * accum * seq, flops)


def run_greenrun(overrides: list[str]) -> dict:
    import tempfile

    from greenrun.core.output import Reporter
    from greenrun.train import activation_checkpointing, memory
    from greenrun.trainer import Trainer

    cfg = greenrun_cfg(overrides)
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()), reporter=Reporter(enabled=False))
    t = cfg.trainer
    tokens = t.micro_batch_size * t.grad_accum_steps * cfg.model.seq_len
    out = timed_steps(trainer.train_step, tokens, trainer.flops_per_token)
    plan = activation_checkpointing.plan(cfg.activation_checkpointing, cfg.model.n_layer)
    est = memory.estimate(cfg.model, t.micro_batch_size, cfg.model.seq_len, cfg.precision.name, plan)
    out.update(
        predicted_mem_gib=est.total / 2**30,
        fp8_layers=len(trainer.prepared),  # the layers the precision converted (fp8: wide linears)
        micro=t.micro_batch_size,
        accum=t.grad_accum_steps,
        params=sum(p.numel() for p in trainer.model.parameters()),
    )
    trainer.close()
    return out


def run_curve(precision: str) -> dict:
    """Loss over the first CURVE_STEPS optimizer steps of the wide config (bf16 vs fp8 must match within 1%)."""
    import tempfile

    from greenrun.core.output import Reporter
    from greenrun.trainer import Trainer

    cfg = greenrun_cfg(
        [
            "model.n_embd=4096",
            "model.n_layer=4",
            "model.n_head=32",
            f"precision={precision}",
            "trainer.compile=true",
            "trainer.micro_batch_size=8",
            "trainer.grad_accum_steps=1",
            "optimizer.lr=3e-4",
        ]
    )
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()), reporter=Reporter(enabled=False))
    losses = [trainer.train_step()["loss"] for _ in range(CURVE_STEPS)]
    trainer.close()
    return {"losses": losses, "last20_mean": sum(losses[-20:]) / 20}


def run_auto() -> dict:
    """micro_batch_size=auto on GPT-2 124M bf16: choice, probes and time; the largest fitting value for reference."""
    import torch

    from greenrun.runtime import distributed
    from greenrun.train import autobatch

    cfg = greenrun_cfg(
        ["precision=bf16", "trainer.micro_batch_size=auto", "trainer.global_batch_tokens=524288"]
    )
    t0 = time.perf_counter()
    choice = autobatch.resolve(cfg, torch.device("cuda"), 1, log.info)
    seconds = time.perf_counter() - t0
    del distributed
    return {
        "micro_batch": choice.micro_batch,
        "grad_accum_steps": choice.grad_accum_steps,
        "seconds": seconds,
        "probes": [vars(p) for p in choice.probes],
        "note": choice.note,
    }


def run_profile() -> dict:
    """Where the default recipe's step time goes: the top CUDA kernels over 2 profiled steps."""
    import tempfile

    import torch

    from greenrun.core.output import Reporter
    from greenrun.trainer import Trainer

    cfg = greenrun_cfg(["precision=bf16", "trainer.compile=true"])
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()), reporter=Reporter(enabled=False))
    for _ in range(WARMUP):
        trainer.train_step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            trainer.train_step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    top = [
        {"name": e.key[:90], "ms": e.device_time_total / 1000 / 2, "share": e.device_time_total / total}
        for e in events[:20]
    ]
    trainer.close()
    return {"gpu_ms_per_step": total / 1000 / 2, "top_kernels": top}


def child(name: str) -> dict:
    if name == "profile_default":
        return run_profile()
    if name == "auto":
        return run_auto()
    if name.startswith("curve_wide_"):
        return run_curve(name.rsplit("_", 1)[1])
    kind, opts = ROWS[name]
    return run_hf(opts) if kind == "hf" else run_greenrun(opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", choices=sorted(GROUPS))
    ap.add_argument("--row")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=560)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.row:  # child process
        result = child(args.row)
        Path(args.out).write_text(json.dumps(result))
        return
    import torch

    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "global_batch": GLOBAL,
        "warmup_steps": WARMUP,
        "timed_steps": TIMED,
        "rows": {},
    }
    t_start = time.perf_counter()
    for name in GROUPS[args.group]:
        if time.perf_counter() - t_start > args.budget_s:
            info["rows"][name] = {"error": "skipped: time budget"}
            continue
        tmp = Path(args.out).with_suffix(f".{name}.json")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--row", name, "--out", str(tmp)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"},
            timeout=max(30, args.budget_s - (time.perf_counter() - t_start)),
        )
        row = (
            json.loads(tmp.read_text())
            if proc.returncode == 0 and tmp.exists()
            else {"error": (proc.stderr or proc.stdout)[-1500:]}
        )
        row["wall_s"] = time.perf_counter() - t0
        info["rows"][name] = row
        tmp.unlink(missing_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=1))
        brief = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()
            if k
            in (
                "tok_per_s",
                "mfu",
                "peak_mem_gib",
                "predicted_mem_gib",
                "ms_per_step",
                "j_per_token",
                "fp8_layers",
                "micro_batch",
                "seconds",
                "last20_mean",
                "wall_s",
                "error",
            )
        }
        log.info("%s %s", name, brief)
    Path(args.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
