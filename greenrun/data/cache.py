"""The token cache: train a byte-level BPE on the corpus, encode it into shards, publish it atomically.

The expensive part runs once and is cached under `<cache_dir>/<key[:16]>/`, where the key hashes the
corpus text and every setting that changes the bytes on disk. meta.json is written last: its presence
marks a complete cache, and builders (torchrun ranks) serialise on a lock, then rename into place.

Window scores for curriculum=difficulty live beside the shards (`cached_scores`): scores-<name>.npy plus a
JSON file written after it that marks it complete. Both are plain data: loading them never runs code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from greenrun.core.fs import atomic_write
from greenrun.data.dataset import Dataset
from greenrun.data.sources import DataConfig, DataError, Doc, documents, iter_texts, validate

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
    fcntl = None

FORMAT_VERSION = 3  # bump when the layout or text -> tokens changes, so old caches miss
SCORES_VERSION = 1  # bump when a window score or the tiling changes, so old score files miss
EOT = "<|endoftext|>"
_PIECE_CHARS = 1_000_000  # longest text handed to the tokenizer at once
_BATCH_CHARS = 4_000_000  # text per encode_batch call: enough to keep every core busy


def _cache_key(cfg: DataConfig, vocab_size: int, docs: list[Doc]) -> tuple[str, dict]:
    text_hash, names = hashlib.sha256(), []
    n_chars = 0
    for doc, text in iter_texts(docs, cfg.max_chars, cfg.encoding, cfg.encoding_errors):
        data = text.encode("utf-8")
        # Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
        text_hash.update(f"{doc.rel}\0{len(data)}\0".encode() + data)
        names.append(doc.rel)
        n_chars += len(text)
    if not names:
        raise DataError(
            f"data.paths {list(cfg.paths)}: all {len(docs)} matched files are empty — point data.paths "
            "at files with text, or use data=stdlib for the bundled corpus"
        )
    settings = [FORMAT_VERSION, tokenizers.__version__, cfg.source, cfg.max_chars, vocab_size]
    settings += [cfg.val_fraction, cfg.shard_tokens, text_hash.hexdigest()]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    summary = {"source": cfg.source, "paths": list(cfg.paths), "documents": len(names), "chars": n_chars}
    return key, summary | {"first": names[0], "last": names[-1]}


def _train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte, so no text is ever out of vocabulary
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _batches(docs: list[Doc], cfg: DataConfig) -> Iterator[list[tuple[str, bool]]]:
    """Lists of (piece, ends_document), ~_BATCH_CHARS of text each. Long documents are cut at
    newlines so that one huge file is never tokenized in one go: memory stays bounded."""
    batch, chars = [], 0
    for _, text in iter_texts(docs, cfg.max_chars, cfg.encoding, cfg.encoding_errors):
        start = 0
        while start < len(text):
            end = len(text)
            if end - start > _PIECE_CHARS:
                end = text.rfind("\n", start, start + _PIECE_CHARS) + 1 or start + _PIECE_CHARS
            batch.append((text[start:end], end == len(text)))
            chars, start = chars + end - start, end
            if chars >= _BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _encode_stream(tok: Tokenizer, batches: Iterator[list], path: Path, dtype: np.dtype) -> int:
    """Write every document's tokens, each followed by EOT (GPT-2 style), to one raw file."""
    eot, total = np.array([tok.token_to_id(EOT)], dtype=dtype), 0
    with open(path, "wb") as fh:
        for batch in batches:
            encoded = tok.encode_batch_fast([piece for piece, _ in batch], add_special_tokens=False)
            for enc, (_, ends_doc) in zip(encoded, batch, strict=True):
                ids = np.concatenate([enc.ids, eot] if ends_doc else [enc.ids]).astype(dtype)
                ids.tofile(fh)
                total += ids.size
    return total


def _build_into(
    tmp: Path, cfg: DataConfig, vocab_size: int, docs: list[Doc], key: str, summary: dict
) -> None:
    t0 = time.perf_counter()
    pieces = (piece for batch in _batches(docs, cfg) for piece, _ in batch)
    tok = _train_tokenizer(pieces, vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    dtype = np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")
    total = _encode_stream(tok, _batches(docs, cfg), tmp / "stream.bin", dtype)
    n_val = math.ceil(total * cfg.val_fraction)  # the tail, so val text is never seen in training
    if total - n_val < 1:
        raise DataError(f"corpus too small: {total} tokens — add text or raise data.max_chars")
    stream = np.memmap(tmp / "stream.bin", dtype=dtype, mode="r")
    shards: dict[str, list[int]] = {"train": [], "val": []}
    for split, lo, hi in (("train", 0, total - n_val), ("val", total - n_val, total)):
        for start in range(lo, hi, cfg.shard_tokens):
            part = stream[start : min(start + cfg.shard_tokens, hi)]
            with open(tmp / f"{split}-{len(shards[split]):05d}.bin", "wb") as fh:
                part.tofile(fh)
                os.fsync(fh.fileno())  # data must be durable before the marker below can exist
            shards[split].append(int(part.size))
    del stream
    (tmp / "stream.bin").unlink()
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "requested_vocab_size": vocab_size,
        "eot_id": tok.token_to_id(EOT),
        "train_tokens": total - n_val,
        "val_tokens": n_val,
        "shards": shards,
        "config": {k: getattr(cfg, k) for k in ("max_chars", "val_fraction", "shard_tokens")},
        "sources": summary,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    with open(tmp / "meta.json", "w") as fh:  # written last: its presence marks a complete cache
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _is_complete(path: Path, key: str) -> bool:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and meta.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise builders (e.g. torchrun ranks): one trains, the others wait and then hit the cache."""
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _publish(final: Path, key: str, fill: Callable[[Path], None]) -> None:
    """Fill a private temp dir, then rename it into place: readers never see a half-built cache."""
    if final.exists():  # no valid meta.json: a deleted marker, a partial copy, a key collision
        shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, key):  # else a builder the lock did not stop won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(cfg: DataConfig, vocab_size: int, *, seq_len: int = 0) -> Dataset:
    """The dataset for cfg, built and cached on first use.

    With seq_len > 0, a split too small for one window of seq_len + 1 tokens fails here, before training.
    """
    problems = validate(cfg)
    if vocab_size < 257:
        problems.append(f"vocab_size: a byte-level BPE needs >= 257 (256 bytes + EOT), got {vocab_size}")
    if problems:
        raise DataError("\n".join(problems))
    docs = documents(cfg)
    key, summary = _cache_key(cfg, vocab_size, docs)
    final = Path(os.path.expanduser(cfg.cache_dir)) / key[:16]
    if not _is_complete(final, key):
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock(final.parent / f".{final.name}.lock"):
            if not _is_complete(final, key):
                _publish(final, key, lambda tmp: _build_into(tmp, cfg, vocab_size, docs, key, summary))
    dataset = Dataset(final)
    if seq_len > 0:
        dataset.check_fits(seq_len)
    return dataset


# --- window scores (curriculum=difficulty), computed once per cache, score kind, seq_len and reference -------


def scores_name(kind: str, seq_len: int, key: str = "") -> str:
    """The score files' stem: `key` (e.g. the reference checkpoint's hash) tells apart two scores of one kind."""
    return f"scores-{kind}-{seq_len}" + (f"-{key[:16]}" if key else "")


def _read_scores(ds: Dataset, name: str, expect: dict) -> np.ndarray | None:
    try:
        meta = json.loads((ds.cache_path / f"{name}.json").read_text())
        scores = np.load(ds.cache_path / f"{name}.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    same = isinstance(meta, dict) and all(meta.get(k) == v for k, v in expect.items())
    if not same or scores.shape != (expect["windows"],) or scores.dtype != np.float64:
        return None  # another tiling, a torn copy, or a file of the same name from elsewhere: recompute
    return scores


def cached_scores(
    ds: Dataset, kind: str, seq_len: int, key: str, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, bool]:
    """(one float64 score per window of ds's train tiling at seq_len, whether `compute` ran now).

    The first caller computes and publishes them; later ones (other torchrun ranks, resumed processes) wait
    on a lock and read the file back.
    """
    name = scores_name(kind, seq_len, key)
    windows = int(ds.tiles(seq_len)[-1]) if len(ds.shards["train"]) else 0
    expect = {"version": SCORES_VERSION, "kind": kind, "seq_len": seq_len, "key": key, "windows": windows}
    expect["cache_key"] = ds.cache_key
    found = _read_scores(ds, name, expect)
    if found is not None:
        return found, False
    with _lock(ds.cache_path / f".{name}.lock"):
        found = _read_scores(ds, name, expect)
        if found is not None:
            return found, False
        t0 = time.perf_counter()
        scores = np.ascontiguousarray(compute(), dtype=np.float64)
        if scores.shape != (windows,):
            raise ValueError(f"{kind} scores: {scores.shape} for {windows} windows")
        meta = expect | {"seconds": round(time.perf_counter() - t0, 3)}
        atomic_write(ds.cache_path / f"{name}.npy", lambda fh: np.save(fh, scores, allow_pickle=False))
        atomic_write(ds.cache_path / f"{name}.json", json.dumps(meta, indent=1))  # last: marks complete
    return scores, True
