"""Steps (and tokens, and seconds) to a target validation loss on the CPU, one row per optimizer, schedule,
curriculum and early-stopping option, for the tiny default model: cheap, and it shows the direction.

    python3 scripts/bench_levers_cpu.py --out docs/bench/<date>_cpu_levers/levers.json [--steps 150] [--target 5.5]

Every row is a real `greenrun train` in its own process with the default config (tiny model, AdamW + cosine,
the embedded corpus) plus the row's overrides, `trainer.max_steps` steps, a validation evaluation every 10 steps
over 4 batches. Reported: the first evaluated step at or under the target, its tokens, the wall seconds to it
(metrics.jsonl's elapsed_s), the final validation loss at the fixed token budget, where early stopping stopped.
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

ROWS: dict[str, list[str]] = {
    "adamw_cosine (baseline)": [],
    "adafactor": ["optimizer=adafactor"],
    "lion": ["optimizer=lion"],
    "muon": ["optimizer=muon"],
    "adamw8bit": ["optimizer=adamw8bit"],  # CUDA only: the row records the refusal
    "schedule=linear": ["schedule=linear"],
    "schedule=step": ["schedule=step"],
    "schedule=wsd": ["schedule=wsd"],
    "schedule=constant": ["schedule=constant"],
    "curriculum=seqlen": ["curriculum=seqlen", "curriculum.start_len=64", "curriculum.ramp_steps=60"],
    "curriculum=difficulty (rarity)": ["curriculum=difficulty", "curriculum.score=rarity", "curriculum.ramp_steps=60"],
    "curriculum=difficulty (length)": ["curriculum=difficulty", "curriculum.score=length", "curriculum.ramp_steps=60"],
    "early_stopping=on": ["early_stopping=on", "early_stopping.patience=3", "early_stopping.min_delta=0.01"],
}  # fmt: skip


def run_row(overrides: list[str], steps: int, target: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="greenrun-levers-"))
    base = [f"trainer.max_steps={steps}", "trainer.eval_interval=10", "trainer.eval_batches=4"]
    base += ["trainer.sample_tokens=0", "preflight=false", "checkpoint.interval=0", f"run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "greenrun", "train", *base, *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"exit": proc.returncode, "error": (proc.stderr or proc.stdout).strip()[-600:], "wall_s": wall}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "exit": 0,
        "steps_to_target": hit["step"] if hit else None,
        "tokens_to_target": hit["tokens"] if hit else None,
        "seconds_to_target": hit.get("elapsed_s") if hit else None,
        "final_val_loss": evals[-1]["val_loss"],
        "final_step": evals[-1]["step"],
        "early_stop": summary.get("early_stop") or summary.get("stopped_early"),
        "wall_s": wall,
        "val_curve": [(r["step"], round(r["val_loss"], 4)) for r in evals],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--target", type=float, default=5.5)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    args = ap.parse_args()
    result = {"steps": args.steps, "target_val_loss": args.target, "rows": {}}
    for name in args.rows:
        result["rows"][name] = row = run_row(ROWS[name], args.steps, args.target)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        brief = {k: v for k, v in row.items() if k != "val_curve"}
        print(name, brief, flush=True)


if __name__ == "__main__":
    main()
