"""Steps, seconds and GPU energy to a target validation loss on one GPU, one row per optimizer, schedule,
curriculum and early-stopping option, for GPT-2 124M on the embedded corpus with the GPU recipe's settings.

    python3 scripts/bench_levers_gpu.py --out $OUT/levers.json [--steps 200] [--budget-s 500]

Every row is `+recipe=gpt2_gpu` (bf16, compiled, fused AdamW, micro-batch 64 at T=1024) plus the row's overrides,
in its own process, trained by greenrun's Trainer for `--steps` optimizer steps of 65,536 tokens (gradient
accumulation 1: the recipe's 524,288-token batch would leave a handful of steps in this time budget; the
`nanogpt_batch` row trains the same tokens at that batch), evaluated every 20 steps over 8 batches.
The target is the baseline's validation loss at 75% of its steps, fixed after the baseline row ran; each row
reports the first evaluation at or under it (step, tokens, training seconds, joules from metrics.jsonl), the
final validation loss at the fixed token budget, peak memory, and where early stopping stopped.
Alongside each row the script samples `nvidia-smi --query-gpu=power.draw` every 100 ms and integrates it over
the training loop's own window, an independent check of greenrun's NVML energy counter (issue 12).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_EVERY = 20
BASE = ["+recipe=gpt2_gpu", "trainer.grad_accum_steps=1", "trainer.eval_batches=8", "trainer.sample_tokens=0",
        "checkpoint.interval=0", "data.cache_dir=/tmp/greenrun-cache", "trainer.log_interval=20"]  # fmt: skip

ROWS: dict[str, list[str]] = {  # in the order they run: the time budget drops the last ones first
    "adamw_cosine (baseline)": [],
    "muon": ["optimizer=muon", "optimizer.lr=6e-4"],
    "schedule=wsd": ["schedule=wsd"],
    "curriculum=seqlen": ["curriculum=seqlen", "curriculum.pacing=exponential", "curriculum.start_len=128",
                          "curriculum.ramp_steps={ramp}"],
    "curriculum=difficulty (length)": ["curriculum=difficulty", "curriculum.score=length",
                                       "curriculum.ramp_steps={ramp}"],
    "adamw8bit": ["optimizer=adamw8bit", "optimizer.lr=6e-4"],
    "lion": ["optimizer=lion", "optimizer.lr=1.2e-4", "optimizer.weight_decay=0.5"],  # 5x below AdamW's lr
    "adafactor": ["optimizer=adafactor", "optimizer.lr=1e-2", "optimizer.weight_decay=0"],  # the paper's cap
    "early_stopping=on": ["early_stopping=on", "early_stopping.patience=3", "early_stopping.min_delta=0.01"],
    "nanogpt_batch (524,288 tokens/step)": ["trainer.grad_accum_steps=8", "trainer.max_steps={steps8}",
                                            "schedule.warmup_steps={warm8}", "trainer.eval_interval=5",
                                            "trainer.log_interval=5"],
    "schedule=constant": ["schedule=constant"],
    "schedule=linear": ["schedule=linear"],
    "schedule=step": ["schedule=step"],
}  # fmt: skip


class PowerSampler:
    """nvidia-smi's power.draw every 100 ms, timestamped by nvidia-smi itself; integrated by the trapezoid rule."""

    def __init__(self) -> None:
        cmd = [
            "nvidia-smi",
            "--query-gpu=timestamp,power.draw",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, float]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                stamp, watts = (f.strip() for f in line.split(","))
                t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((t, float(watts)))
            except ValueError:
                continue

    def joules(self, t0: float, t1: float) -> tuple[float, int]:
        self.proc.terminate()
        self.thread.join(timeout=5)
        pts = [(t, w) for t, w in self.samples if t0 <= t <= t1]
        total = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts[:-1], pts[1:], strict=True))
        return total, len(pts)


def child(overrides: list[str]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from greenrun import config
    from greenrun.core.output import Reporter
    from greenrun.core.shipped import conf_dir
    from greenrun.trainer import Trainer

    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = config.to_typed(compose(config_name="config", overrides=overrides))
    config.validate(cfg)
    run_dir = Path(tempfile.mkdtemp(prefix="greenrun-levers-"))
    trainer = Trainer(cfg, run_dir, reporter=Reporter(enabled=False))
    stamps = {}
    start = trainer.energy.start

    def stamped_start() -> None:  # the meter's own window: from here to the end of train()
        start()
        stamps["t0"] = time.time()

    trainer.energy.start = stamped_start
    sampler = PowerSampler()
    result = trainer.train()
    t1 = time.time()
    smi_j, n = sampler.joules(stamps["t0"], t1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    trainer.close()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    device_kwh = result["energy"].get("device_kwh")
    joules = device_kwh * 3.6e6 if device_kwh is not None else None
    return {
        "evals": [
            {k: r.get(k) for k in ("step", "tokens", "val_loss", "elapsed_s", "joules")}
            for r in records
            if "val_loss" in r
        ],  # fmt: skip
        "tok_per_s": result["tok_per_s"],
        "peak_mem_gib": peak,
        "energy": result["energy"],
        "early_stop": result["early_stop"],
        "step": result["step"],
        "nvidia_smi_j": smi_j,
        "nvidia_smi_samples": n,
        "nvml_j": joules,
        "nvml_vs_smi": joules / smi_j if joules and smi_j else None,
    }


def against(row: dict, target: float) -> dict:
    """The first evaluation at or under the target, and the final one."""
    evals = [e for e in row["evals"] if e["step"] > 0]
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    return {
        "steps_to_target": hit["step"] if hit else None,
        "tokens_to_target": hit["tokens"] if hit else None,
        "seconds_to_target": hit["elapsed_s"] if hit else None,
        "joules_to_target": hit["joules"] if hit else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_tokens": evals[-1]["tokens"] if evals else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=500)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--target", type=float, help="a target from an earlier call's baseline (else its own)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        overrides = json.loads(args.child)
        Path(args.out).write_text(json.dumps(child(overrides)))
        return
    steps = args.steps
    fill = {"ramp": str(int(0.4 * steps)), "steps8": str(steps // 8), "warm8": str(max(1, steps // 80))}
    common = [*BASE, f"trainer.max_steps={steps}", f"schedule.warmup_steps={steps // 10}",
              f"trainer.eval_interval={EVAL_EVERY}"]  # fmt: skip
    result = {"steps": steps, "tokens_per_step": 65536, "eval_every": EVAL_EVERY, "rows": {}}
    if args.target:
        result["target_val_loss"] = args.target
    t_start = time.perf_counter()
    for name in args.rows:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 45:
            result["rows"][name] = {"error": "skipped: time budget"}
            continue
        overrides = [*common, *(o.format(**fill) for o in ROWS[name])]
        tmp = args.out.with_suffix(".child.json")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--out", str(tmp), "--child", json.dumps(overrides)],
                capture_output=True, text=True, timeout=left,
                env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"},
            )  # fmt: skip
            ok = proc.returncode == 0 and tmp.exists()
            row = json.loads(tmp.read_text()) if ok else {"error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": "timed out: time budget"}
        tmp.unlink(missing_ok=True)
        row["wall_s"] = time.perf_counter() - t0
        row["overrides"] = overrides
        if "target_val_loss" not in result and "evals" in row:  # the baseline fixes the target
            evals = [e for e in row["evals"] if e["step"] > 0]
            at = min(evals, key=lambda e: abs(e["step"] - 0.75 * steps))
            result["target_val_loss"] = at["val_loss"]
        if "evals" in row:
            row.update(against(row, result["target_val_loss"]))
        result["rows"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        keys = ("steps_to_target", "seconds_to_target", "joules_to_target", "final_val_loss", "tok_per_s",
                "peak_mem_gib", "nvml_vs_smi", "early_stop", "wall_s", "error")  # fmt: skip
        print(name, {k: row.get(k) for k in keys if k in row}, flush=True)


if __name__ == "__main__":
    main()
