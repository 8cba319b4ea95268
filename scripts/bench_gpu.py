"""One-GPU speed matrix: HF compiled, a plain-PyTorch reference loop, and greenrun before and after each lever.

    python3 scripts/bench_gpu.py --group speed --out $OUT/speed.json     # tokens/s rows (issue 10's table)
    python3 scripts/bench_gpu.py --group quality --out $OUT/quality.json # micro-batch curve, loss at a budget
    BEFORE=/path/to/older/greenrun python3 scripts/bench_gpu.py ...      # where the gr_before rows import from

Every row runs in its own subprocess (fresh allocator, fresh peak-memory counters), GPT-2 124M at T=1024,
bf16 autocast, compiled, 524,288 tokens per optimizer step (micro-batch x accumulation x 1024) unless the row
says otherwise. Reported per row: tokens/s, MFU = tokens/s x (6 N + 12 L H Q T) / 989 TFLOP/s (N = non-embedding
parameters + the padded head, greenrun.train.model.flops_per_token; the H200's dense bf16 datasheet peak), peak
allocated memory, ms per optimizer step and J/token from NVML's energy counter. The parent prints the ratios
against the HF compiled row and the reference row at the same micro-batch, all measured in this one call.
Earlier matrices (H100 levers, fp8, checkpointing policies) came from this script's older revisions in git.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ, TOKENS = 1024, 524_288
WARMUP, TIMED = 2, 3  # optimizer steps; the first warm-up step compiles
BASE = ["precision=bf16", "trainer.compile=true"]
NOBIAS = BASE + ["model.bias=false"]


def gr(micro: int, *over: str, before: bool = False, sync: bool = False) -> dict:
    return {"kind": "gr_before" if before else "gr", "micro": micro, "over": list(over), "sync": sync}


ROWS: dict[str, dict] = {
    "hf_compile_mb16": {"kind": "hf", "micro": 16},
    "ref_mb16": {"kind": "ref", "micro": 16, "bias": True},
    "ref_mb64": {"kind": "ref", "micro": 64, "bias": True},
    "ref_nobias_mb16": {"kind": "ref", "micro": 16, "bias": False},
    "ref_nobias_mb64": {"kind": "ref", "micro": 64, "bias": False},
    "ref_nobias_mb128": {"kind": "ref", "micro": 128, "bias": False},
    "ref_liger_nobias_mb64": {"kind": "ref", "micro": 64, "bias": False, "loss": "liger"},
    "ref_liger_nobias_mb128": {"kind": "ref", "micro": 128, "bias": False, "loss": "liger"},
    "gr_before_mb16": gr(16, *BASE, before=True),
    "gr_before_mb64": gr(64, *BASE, before=True),
    "gr_mb16": gr(16, *BASE),
    "gr_mb64": gr(64, *BASE),
    "gr_nobias_mb16": gr(16, *NOBIAS),
    "gr_nobias_mb64": gr(64, *NOBIAS),
    "gr_nobias_ro_mb16": gr(16, *NOBIAS, "trainer.compile_mode=reduce-overhead"),
    "gr_nobias_ro_mb64": gr(64, *NOBIAS, "trainer.compile_mode=reduce-overhead"),
    "gr_nobias_chunk_mb64": gr(64, *NOBIAS, "model.loss_chunk=8192"),
    "gr_nobias_mb128": gr(128, *NOBIAS),
    "gr_nobias_chunk_mb128": gr(128, *NOBIAS, "model.loss_chunk=8192"),
    "gr_nobias_fp8head_mb16": gr(16, "precision=fp8", "precision.fp8.lm_head=true", "model.bias=false"),
    "gr_nobias_fp8head_mb64": gr(64, "precision=fp8", "precision.fp8.lm_head=true", "model.bias=false"),
    "gr_nobias_autotune_mb16": gr(16, *NOBIAS, "trainer.compile_mode=max-autotune-no-cudagraphs"),
    "profile_nobias_mb16": {"kind": "profile", "micro": 16, "over": NOBIAS},
    "profile_mb64": {"kind": "profile", "micro": 64, "over": BASE},
    "profile_ref_mb64": {"kind": "profile", "micro": 64, "ref": True},
    "gr_sync_mb16": gr(16, *BASE, sync=True),
    "gr_sync_mb64": gr(64, *BASE, sync=True),
    "gr_fp8head_mb64": gr(64, "precision=fp8", "precision.fp8.lm_head=true"),
    "gr_chunk_mb128": gr(128, *BASE, "model.loss_chunk=8192"),
    "ref_liger_mb128": {"kind": "ref", "micro": 128, "bias": True, "loss": "liger"},
    "gr_autotune_mb16": gr(16, *BASE, "trainer.compile_mode=max-autotune-no-cudagraphs"),
    "gr_learn_mb16": gr(16, *BASE, "model.pad_logits=learn"),
    "gr_learn_mb64": gr(64, *BASE, "model.pad_logits=learn"),
    "gr_learn_mb128": gr(128, *BASE, "model.pad_logits=learn"),
    "gr_fp8head_learn_mb64": gr(64, "precision=fp8", "precision.fp8.lm_head=true", "model.pad_logits=learn"),
    "gr_nobias_learn_mb16": gr(16, *NOBIAS, "model.pad_logits=learn"),
    "gr_nobias_learn_mb64": gr(64, *NOBIAS, "model.pad_logits=learn"),
    "gr_nobias_learn_mb128": gr(128, *NOBIAS, "model.pad_logits=learn"),
    "gr_nobias_learn_autotune_mb16": gr(
        16, *NOBIAS, "model.pad_logits=learn", "trainer.compile_mode=max-autotune-no-cudagraphs"
    ),
    "gr_nobias_fp8head_learn_mb64": gr(
        64, "precision=fp8", "precision.fp8.lm_head=true", "model.bias=false", "model.pad_logits=learn"
    ),
}
for mb in (8, 24, 32, 48, 96):
    ROWS[f"gr_nobias_mb{mb}"] = gr(mb, *NOBIAS)
for mb in (8, 32, 128):
    ROWS[f"gr_mb{mb}"] = gr(mb, *BASE)
CURVES = {  # name -> (overrides, steps): the loss at a fixed token budget (32,768 tokens per step)
    "curve_bias": (BASE, 200),
    "curve_nobias": (NOBIAS, 200),
    "curve_nobias_fp8head": (["precision=fp8", "precision.fp8.lm_head=true", "model.bias=false"], 200),
    "curve_learn": (BASE + ["model.pad_logits=learn"], 200),
    "curve_nobias_learn": (NOBIAS + ["model.pad_logits=learn"], 200),
    "curve_nobias_fp8head_learn": (
        ["precision=fp8", "precision.fp8.lm_head=true", "model.bias=false", "model.pad_logits=learn"],
        200,
    ),
}
GROUPS = {
    "speed": [
        "hf_compile_mb16",
        "ref_mb16",
        "ref_nobias_mb16",
        "gr_mb16",
        "gr_nobias_mb16",
        "ref_mb64",
        "ref_nobias_mb64",
        "gr_mb64",
        "gr_nobias_mb64",
        "gr_nobias_fp8head_mb64",
        "gr_nobias_ro_mb16",
        "gr_nobias_chunk_mb64",
        "ref_liger_nobias_mb64",
        "gr_nobias_mb128",
        "gr_nobias_mb32",
        "profile_nobias_mb16",
    ],  # fmt: skip
    "before": ["gr_before_mb16", "gr_before_mb64"],
    "profile": ["profile_mb64", "profile_ref_mb64"],
    # Issue 10's closing call: the step without a host sync, the recipe rows, the micro-batch curve, the
    # fused-loss options at micro-batch 128, the CUDA-graph gradient check; max-autotune last (slow to compile).
    "closing": [
        "hf_compile_mb16",
        "ref_mb16",
        "gr_mb16",
        "gr_sync_mb16",
        "ref_mb64",
        "gr_mb64",
        "gr_fp8head_mb64",
        "gr_mb32",
        "gr_mb128",
        "gr_chunk_mb128",
        "ref_liger_mb128",
        "graphs_check",
        "gr_mb8",
        "gr_autotune_mb16",
    ],  # fmt: skip
    "quality": ["graphs_check", *CURVES, "gr_nobias_mb8"],
    # Session 19: the padding columns inside the softmax (model.pad_logits=learn, the reference's maths) against
    # the mask, at 16, 64 and 128; the fused loss of Liger at 128 beside greenrun's chunked one.
    "pad": [
        "hf_compile_mb16",
        "ref_mb16",
        "gr_mb16",
        "gr_learn_mb16",
        "ref_mb64",
        "gr_mb64",
        "gr_learn_mb64",
        "gr_fp8head_learn_mb64",
        "ref_liger_mb128",
        "gr_learn_mb128",
    ],  # fmt: skip
    "nobias_learn": [
        "hf_compile_mb16",
        "ref_nobias_mb64",
        "gr_nobias_learn_mb64",
        "gr_nobias_fp8head_learn_mb64",
        "gr_nobias_learn_mb128",
    ],  # fmt: skip
    "pad_quality": [
        "curve_bias",
        "curve_learn",
        "curve_nobias",
        "graphs_check",
        "gr_mb8",
        "gr_autotune_mb16",
    ],
    # Session 20: the recipes as they now ship (no biases, learn) at 64 and 128 beside the reference, the loss
    # curves of gpt2_gpu and gpt2_fp8 at a fixed token budget; max-autotune in a call of its own.
    "s20_speed": [
        "hf_compile_mb16",
        "ref_nobias_mb64",
        "gr_nobias_learn_mb64",
        "gr_nobias_fp8head_learn_mb64",
        "ref_nobias_mb128",
        "gr_nobias_learn_mb128",
        "curve_nobias_learn",
        "curve_nobias_fp8head_learn",
    ],  # fmt: skip
    "s20_autotune": ["ref_nobias_mb16", "gr_nobias_learn_mb16", "gr_nobias_learn_autotune_mb16"],
    "final": [
        "ref_nobias_mb16",
        "gr_nobias_mb16",
        "ref_nobias_mb64",
        "gr_nobias_mb64",
        "curve_nobias",
        "curve_nobias_fp8head",
        "curve_bias",
    ],  # fmt: skip
}


def greenrun_cfg(overrides: list[str], micro: int, accum: int):
    from hydra import compose, initialize_config_dir

    from greenrun import config
    from greenrun.core.shipped import conf_dir

    config.register()
    base = [
        "model=gpt2",
        f"trainer.micro_batch_size={micro}",
        f"trainer.grad_accum_steps={accum}",
        "trainer.device=cuda",
        "data.max_chars=0",
        "data.cache_dir=/tmp/greenrun-cache",
        "trainer.max_steps=1000",
        "schedule.warmup_steps=100",
    ]
    keys = {o.split("=", 1)[0] for o in overrides}
    base = [o for o in base if o.split("=", 1)[0] not in keys]  # a row's own value wins
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = config.to_typed(compose(config_name="config", overrides=base + overrides))
    config.validate(cfg)
    return cfg


def timed(step_fn, tokens_per_step: int, flops_per_token: float) -> dict:
    import torch

    from greenrun.runtime import energy

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
    return {
        "tok_per_s": tps,
        "ms_per_step": 1000 * seconds / TIMED,
        "mfu": tps * flops_per_token / 989e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "j_per_token": joules / (TIMED * tokens_per_step) if joules is not None else None,
    }


def gpt2_flops() -> float:
    from greenrun.train import model

    return model.flops_per_token(model.preset("gpt2", seq_len=SEQ))


def run_hf(micro: int, accum: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    net = GPT2LMHeadModel._from_config(GPT2Config(n_positions=SEQ), attn_implementation="sdpa").cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    run = torch.compile(net)

    def step() -> None:
        for _ in range(accum):
            x = torch.randint(0, 50257, (micro, SEQ), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = run(input_ids=x, labels=x).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {**timed(step, micro * accum * SEQ, gpt2_flops()), "attn": net.config._attn_implementation}


def run_ref(row: dict, accum: int) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    import ref_gpt2

    step, _ = ref_gpt2.make_step(row["micro"], accum, SEQ, bias=row["bias"], loss=row.get("loss", "plain"))
    return timed(step, row["micro"] * accum * SEQ, gpt2_flops())


def trainer_for(overrides: list[str], micro: int, accum: int):
    from greenrun.core.output import Reporter
    from greenrun.trainer import Trainer

    cfg = greenrun_cfg(overrides, micro, accum)
    return Trainer(cfg, Path(tempfile.mkdtemp()), reporter=Reporter(enabled=False))


def run_gr(row: dict, accum: int) -> dict:
    trainer = trainer_for(row["over"], row["micro"], accum)
    # As the loop runs a step it does not log: no host sync (row "sync": every step read back, the old way).
    step = trainer.train_step if row.get("sync") else lambda: trainer.train_step(sync=False)
    out = timed(step, trainer.tokens_per_step, gpt2_flops())
    out["skips_on_device"] = trainer.skips_on_device
    out["params"] = sum(p.numel() for p in trainer.model.parameters())
    out["fp8_layers"] = len(trainer.prepared)
    trainer.close()
    return out


def run_profile(row: dict, accum: int) -> dict:
    """Where one optimizer step's GPU time goes: the top kernels, and the busy share of the wall time."""
    import torch

    if row.get("ref"):
        sys.path.insert(0, str(REPO / "scripts"))
        import ref_gpt2

        step, _ = ref_gpt2.make_step(row["micro"], accum, SEQ)
    else:
        trainer = trainer_for(row["over"], row["micro"], accum)
        step = lambda: trainer.train_step(sync=False)  # noqa: E731
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - t0)
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    busy = sum(e.device_time_total for e in events) / 1000
    top = [{"name": e.key[:160], "ms": e.device_time_total / 1000, "calls": e.count}
           for e in events[:40]]  # fmt: skip
    return {"gpu_busy_ms": busy, "wall_ms": wall_ms, "top_kernels": top}


def run_curve(name: str) -> dict:
    """Train `steps` optimizer steps of 32,768 tokens; the validation loss at the end, over 40 batches."""
    overrides, steps = CURVES[name]
    extra = [f"trainer.max_steps={steps}", "schedule.warmup_steps=30", "trainer.eval_batches=40"]
    trainer = trainer_for(overrides + extra, 16, 2)
    t0 = time.perf_counter()
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    seconds = time.perf_counter() - t0
    val = trainer.evaluate()
    trainer.close()
    return {"losses": losses, "last20_mean": sum(losses[-20:]) / 20, "val_loss": val, "train_s": seconds}


def run_graphs_check() -> dict:
    """The same 4 optimizer steps (micro-batch 16 x 8) without and with CUDA graphs: losses and gradient norms."""
    out = {}
    for mode in ("default", "reduce-overhead"):
        trainer = trainer_for(NOBIAS + [f"trainer.compile_mode={mode}"], 16, 8)
        stats = [trainer.train_step() for _ in range(4)]
        out[mode] = {"loss": [s["loss"] for s in stats], "grad_norm": [s["grad_norm"] for s in stats]}
        trainer.close()
    a, b = out["default"], out["reduce-overhead"]
    out["max_rel_diff"] = max(abs(x - y) / abs(x) for k in a for x, y in zip(a[k], b[k], strict=True))
    return out


def child(name: str) -> dict:
    if name == "graphs_check":
        return run_graphs_check()
    if name in CURVES:
        return run_curve(name)
    row = ROWS[name]
    accum = TOKENS // (row["micro"] * SEQ)
    run = {"hf": lambda: run_hf(row["micro"], accum), "ref": lambda: run_ref(row, accum),
           "profile": lambda: run_profile(row, accum)}.get(row["kind"], lambda: run_gr(row, accum))  # fmt: skip
    return {"micro": row["micro"], "accum": accum, **run()}


def ratios(rows: dict) -> None:
    """Each row against HF compiled and the reference (same bias, same micro-batch) of this call."""
    hf = rows.get("hf_compile_mb16", {}).get("tok_per_s")
    for name, row in rows.items():
        tps = row.get("tok_per_s")
        if not tps:
            continue
        ref_name = f"ref{'_nobias' if 'nobias' in name else ''}_mb{row['micro']}"
        ref = rows.get(ref_name, {}).get("tok_per_s") or rows.get(f"ref_mb{row['micro']}", {}).get(
            "tok_per_s"
        )
        row["vs_hf_compile"] = tps / hf if hf else None
        row["vs_ref"] = tps / ref if ref else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", choices=sorted(GROUPS))
    ap.add_argument("--row")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    args = ap.parse_args()
    if args.row:  # child process
        Path(args.out).write_text(json.dumps(child(args.row)))
        return
    import torch

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens_per_step": TOKENS,
            "warmup_steps": WARMUP, "timed_steps": TIMED, "rows": {}}  # fmt: skip
    t_start = time.perf_counter()
    for name in GROUPS[args.group]:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            info["rows"][name] = {"error": "skipped: time budget"}
            continue
        tmp = Path(args.out).with_suffix(f".{name}.json")
        before = ROWS.get(name, {}).get("kind") == "gr_before"
        path = os.environ.get("BEFORE", "") if before else str(REPO)
        env = {**os.environ, "PYTHONPATH": f"{path}:{os.environ.get('PYTHONPATH', '')}"}
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--row", name, "--out", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
            ok = proc.returncode == 0 and tmp.exists()
            row = json.loads(tmp.read_text()) if ok else {"error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": "timed out: time budget"}
        row["wall_s"] = time.perf_counter() - t0
        info["rows"][name] = row
        tmp.unlink(missing_ok=True)
        ratios(info["rows"])
        Path(args.out).write_text(json.dumps(info, indent=1))
        keys = ("tok_per_s", "vs_ref", "vs_hf_compile", "mfu", "peak_mem_gib", "j_per_token", "val_loss",
                "last20_mean", "max_rel_diff", "gpu_busy_ms", "wall_ms", "wall_s", "error")  # fmt: skip
        brief = {k: round(row[k], 4) if isinstance(row[k], float) else row[k] for k in keys if k in row}
        print(name, brief, flush=True)


if __name__ == "__main__":
    main()
