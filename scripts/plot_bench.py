"""Plot the activation-checkpointing trade-off from bench_gpu.py's JSON: time per step vs peak memory.

    python3 scripts/plot_bench.py docs/bench/2026-11-22_h100_levers/bench_a.json \
        docs/bench/2026-11-22_h100_levers/bench_b.json --out docs/ckpt_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = {
    "gr_bf16_compile": "none",
    "gr_ckpt_selective": "selective",
    "gr_ckpt_every2": "every_k (k=2)",
    "gr_ckpt_sqrt": "sqrt",
    "gr_ckpt_full": "full",
}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows: dict = {}
    for path in args.files:
        rows.update(json.loads(Path(path).read_text())["rows"])
    base = rows["gr_bf16_compile"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in ROWS.items():
        r = rows[name]
        x, y = r["peak_mem_gib"], r["ms_per_step"] / base["ms_per_step"]
        ax.scatter(x, y)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("peak GPU memory, GiB (GPT-2 124M, micro-batch 16 x 1024, bf16, compiled)")
    ax.set_ylabel("time per step / no checkpointing")
    ax.set_title("Activation checkpointing on one H100")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
