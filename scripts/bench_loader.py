"""How far ahead of the GPU the data loader runs: tokenisation and batch delivery, in tokens/s, on CPU only.

  (a) tokenisation: this interpreter's own Python source (standard library and site-packages, real text
      present on every machine, one JSON Lines record per file) through a byte-level BPE asked for GPT-2's
      50,257 ids (trained here on the first --train-chars characters; the JSON says how many it learned),
      into a fresh token cache with data.workers=1 and data.workers=N;
  (b) delivery: Dataset.batch at GPT-2 124M shapes (micro-batch 16 and 64 x 1024 tokens) from that cache.
Both are compared with what GPT-2 124M training consumes on one H200 (--gpu-tokens-per-s, about 500k/s): the
loader should deliver at least 10x that. Writes JSON to --out and prints one summary line.

    python scripts/bench_loader.py --out docs/bench/loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from greenrun import data
from greenrun.core import output

GPT2_VOCAB = 50257
SEQ_LEN = 1024
MICRO_BATCHES = (16, 64)


def _corpus(root: Path, chars: int) -> Path:
    """Up to `chars` characters of this interpreter's Python source (its library, then its installed packages),
    one JSON Lines record per file, in 8 MB files: files that do not decode as UTF-8 are left out."""
    roots = dict.fromkeys([sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]])
    root.mkdir(parents=True)
    part, written, out = 0, 0, None
    try:
        for path in (path for r in roots for path in sorted(Path(r).rglob("*.py"))):
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if out is None or out.tell() > 8_000_000:
                if out is not None:
                    out.close()
                out = open(root / f"part-{part:03d}.jsonl", "w")  # noqa: SIM115 - closed here and below
                part += 1
            out.write(json.dumps({"text": text}) + "\n")
            written += len(text)
            if written >= chars:
                break
    finally:
        if out is not None:
            out.close()
    return root


def _build(root: Path, name: str, **kw: object) -> tuple[data.Dataset, float]:
    cfg = data.DataConfig(cache_dir=str(root / name), **kw)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    ds = data.build(cfg, GPT2_VOCAB)
    return ds, time.perf_counter() - t0


def _delivery(ds: data.Dataset, batch: int, seconds: float) -> dict:
    ds.batch("train", 0, 0, batch, SEQ_LEN, 0)  # index the windows once, as a run's first step does
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds.batch("train", steps, 0, batch, SEQ_LEN, 1337)
        steps += 1
    elapsed = time.perf_counter() - t0
    return {
        "micro_batch": batch,
        "seq_len": SEQ_LEN,
        "batches": steps,
        "tokens_per_s": batch * SEQ_LEN * steps / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--chars", type=int, default=48_000_000, help="corpus characters to tokenise")
    parser.add_argument("--train-chars", type=int, default=4_000_000, help="characters the BPE learns from")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the parallel build")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per delivery measurement")
    parser.add_argument("--gpu-tokens-per-s", type=float, default=500_000.0, help="what training consumes")
    args = parser.parse_args()
    output.setup()
    root = Path(tempfile.mkdtemp(prefix="greenrun-bench-loader-"))
    try:
        text = {"source": "text", "paths": [str(_corpus(root / "corpus", args.chars) / "*.jsonl")]}
        bpe, train_s = _build(root, "bpe", **text, max_chars=args.train_chars)
        tok = str(bpe.cache_path / "tokenizer.json")
        runs = {}
        for workers in sorted({1, max(1, args.workers)}):
            ds, wall = _build(root, f"w{workers}", **text, max_chars=args.chars, tokenizer="path",
                              tokenizer_path=tok, workers=workers, group_bytes=8 << 20)  # fmt: skip
            build = ds.meta["build"]
            runs[workers] = {"workers": workers, "tokens": build["tokens"], "shards": len(ds.meta["files"]),
                             "tokens_per_s": build["tokens_per_s"], "build_wall_s": round(wall, 2)}  # fmt: skip
        deliveries = [_delivery(ds, batch, args.seconds) for batch in MICRO_BATCHES]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gpu = args.gpu_tokens_per_s
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "tokenizer": {
            "kind": "bpe",
            "vocab_size": bpe.vocab_size,
            "train_chars": args.train_chars,
            "train_s": round(train_s, 2),
        },
        "tokenise": list(runs.values()),
        "delivery": deliveries,
        "gpu_tokens_per_s": gpu,
        "headroom": {f"{d['micro_batch']}x{SEQ_LEN}": d["tokens_per_s"] / gpu for d in deliveries},
        "target_headroom": 10.0,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    tokenise = ", ".join(
        f"{r['tokens_per_s'] / 1e6:.2f}M tok/s ({r['workers']} worker(s))" for r in runs.values()
    )
    delivery = ", ".join(
        f"{d['micro_batch']}x{SEQ_LEN} {d['tokens_per_s'] / 1e6:,.0f}M tok/s ({d['tokens_per_s'] / gpu:,.0f}x)"
        for d in deliveries
    )
    output.say(
        f"loader on {os.cpu_count()} CPUs: tokenise {tokenise}; Dataset.batch {delivery} vs {gpu:,.0f} tok/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
