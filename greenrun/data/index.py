"""The token cache's index (meta.json): which files hold the tokens, and how the splits are cut from them.

Layout 2 (this one): shard files `shard-NNNNN.bin`, one per group of records, hard links into the shard
store; their concatenation is the token stream. The validation split is the stream's tail (so no validation
text is ever trained on) and each split is cut into segments of data.shard_tokens tokens, which batch
windows never cross; a segment is a list of pieces [file, offset, tokens] since it may span shard files.
That cut is the one layout 1 made by copying (`train-NNNNN.bin`, `val-NNNNN.bin`, still read): the same
corpus gives the same segments, so the same batches.

Nothing here imports more than numpy: a download is checked against the index before anything loads it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

LAYOUT = 2
_HASH_CHUNK = 1 << 22


def shard_file(i: int) -> str:
    return f"shard-{i:05d}.bin"


def split_segments(counts: list[int], val_fraction: float, shard_tokens: int) -> tuple[int, int, dict]:
    """(train tokens, val tokens, {split: [segment, ...]}) for shard files of `counts` tokens, in order."""
    total = sum(counts)
    n_val = math.ceil(total * val_fraction)
    starts = np.cumsum([0, *counts])
    segments: dict[str, list[list[list[int]]]] = {"train": [], "val": []}
    for split, lo, hi in (("train", 0, total - n_val), ("val", total - n_val, total)):
        for start in range(lo, hi, shard_tokens):
            segments[split].append(_pieces(starts, start, min(start + shard_tokens, hi)))
    return total - n_val, n_val, segments


def _pieces(starts: np.ndarray, lo: int, hi: int) -> list[list[int]]:
    pieces = []
    f = int(np.searchsorted(starts, lo, side="right")) - 1
    while lo < hi:
        end = min(hi, int(starts[f + 1]))
        if end > lo:
            pieces.append([f, lo - int(starts[f]), end - lo])
        lo, f = end, f + 1
    return pieces


def files(meta: dict) -> dict[str, int]:
    """{file name: size in bytes} of every token file the index names (either layout)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    if meta.get("layout", 1) >= 2:
        return {f["name"]: f["tokens"] * itemsize for f in meta["files"]}
    return {
        f"{split}-{i:05d}.bin": n * itemsize for split, ns in meta["shards"].items() for i, n in enumerate(ns)
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def problem(path: Path, meta: Any, *, check_sha256: bool = False) -> str | None:
    """Why the cache in `path` does not match the index `meta`, or None. With check_sha256 (a download),
    each file's content is compared with the digest the index records, where it records one."""
    if not (path / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    try:
        sizes = files(meta)
        digests = {f["name"]: f.get("sha256") for f in meta.get("files", [])}
        digests["tokenizer.json"] = meta.get("tokenizer", {}).get("sha256_file")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "meta.json is malformed"
    for name, size in sizes.items():
        if not (path / name).is_file() or (path / name).stat().st_size != size:
            return f"{name} is missing or not {size} bytes"
    if check_sha256:
        for name, want in digests.items():
            if want and sha256_of(path / name) != want:
                return f"{name} does not match its sha256 in meta.json"
    return None
