"""Training data: corpus -> byte-level BPE tokenizer -> cached token shards -> random batches.

The default corpus is the Python standard library of the running interpreter: real text that
nobody here wrote, present on every machine, so a first run needs no downloads. `source=text`
reads the user's own files instead.

The expensive part runs once and is cached under `<cache_dir>/<key[:16]>/`, where the key hashes
the corpus text and every setting that changes the bytes on disk. Batches are a pure function of
(seed, split, step, micro_step, rank), so a resumed run needs no iterator state.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import struct
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from greenrun.core import checks

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
    fcntl = None

FORMAT_VERSION = 2  # bump when the layout or text -> tokens changes, so old caches miss
EOT = "<|endoftext|>"
SOURCES = ("stdlib", "text")
_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
_SPLIT_IDS = {"train": 0, "val": 1}
_PIECE_CHARS = 1_000_000  # longest text handed to the tokenizer at once
_BATCH_CHARS = 4_000_000  # text per encode_batch call: enough to keep every core busy


class DataError(ValueError):
    """A data problem the user fixes by changing `data.*` or the files it points at."""


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib (this Python's own standard library, no download) | text (data.paths)
    paths: list[str] = field(default_factory=list)  # files or globs (** recurses) for source=text; ~ ok
    max_chars: int = 4_000_000  # cap on characters read from the corpus (0 = no cap); keeps CPU runs fast
    val_fraction: float = 0.05  # share of the token stream held out for validation (its tail), in (0, 1)
    cache_dir: str = "~/.cache/greenrun"  # tokenizer + token shards, keyed by a hash of text and settings
    shard_tokens: int = 16_777_216  # tokens per memory-mapped shard file; batch windows never cross one


def validate(cfg: DataConfig) -> list[str]:
    """Every problem with cfg that can be seen without reading the corpus."""
    problems = checks.choice("data.source", cfg.source, SOURCES)
    if cfg.max_chars < 0:
        problems.append(f"data.max_chars: must be >= 0 (0 = no cap), got {cfg.max_chars}")
    if not 0.0 < cfg.val_fraction < 1.0:
        problems.append(f"data.val_fraction: must be in (0, 1), e.g. 0.05, got {cfg.val_fraction}")
    if cfg.shard_tokens < 2:
        problems.append(f"data.shard_tokens: must be >= 2, got {cfg.shard_tokens}")
    if cfg.source == "text" and not cfg.paths:
        problems.append(
            "data.paths: empty but data.source=text — set 'data.paths=[corpus/**/*.txt]', "
            "or use data=stdlib for the bundled corpus"
        )
    return problems


# --- corpus ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Doc:
    rel: str  # name in the cache key; relative, so moving a corpus directory keeps its cache
    path: Path
    entry: int  # index into data.paths for error messages; -1 for the stdlib


def _stdlib_docs() -> list[_Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                docs.append(_Doc(path.relative_to(root).as_posix(), path, -1))
    # Ordered by a hash of the path, not the path: deterministic on any filesystem, and a capped corpus and its
    # validation tail are then a random sample of the library rather than its alphabetical first modules
    # (sorted by name, the tail of the default 4M characters was nothing but encodings/cp*.py codec tables).
    return sorted(docs, key=lambda d: hashlib.sha256(d.rel.encode()).hexdigest())


def _text_docs(paths: list[str]) -> list[_Doc]:
    errors, found = [], {}
    for i, entry in enumerate(paths):
        expanded = os.path.expanduser(entry)
        matches = []
        if any(c in expanded for c in "*?["):
            matches = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
            if not matches:
                errors.append(f"data.paths[{i}]: {entry!r} matched no files — check the pattern")
        elif os.path.isdir(expanded):
            errors.append(f"data.paths[{i}]: {entry!r} is a directory — use a glob like '{entry}/**/*.txt'")
        elif not os.path.isfile(expanded):
            where = os.path.abspath(expanded)
            errors.append(f"data.paths[{i}]: {entry!r} does not exist (looked for {where}) — check the path")
        else:
            matches = [Path(expanded)]
        for path in matches:
            found.setdefault(path.resolve(), i)
    if errors:
        raise DataError("\n".join(errors + ["(or use data=stdlib for the bundled corpus)"]))
    ordered = sorted(found, key=str)
    base = Path(os.path.commonpath([p.parent for p in ordered]))
    return [_Doc(p.relative_to(base).as_posix(), p, found[p]) for p in ordered]


def _iter_texts(docs: list[_Doc], max_chars: int) -> Iterator[tuple[_Doc, str]]:
    """Non-empty document texts in order, the last one cut so the total is at most max_chars."""
    budget = max_chars or math.inf
    for doc in docs:
        try:
            text = doc.path.read_bytes().decode("utf-8", errors="strict" if doc.entry < 0 else "replace")
        except (OSError, UnicodeDecodeError) as e:
            if doc.entry < 0:
                continue  # a few stdlib files use legacy encodings; leaving them out keeps the text clean
            raise DataError(f"data.paths[{doc.entry}]: cannot read {doc.path}: {e}") from e
        text = text[: int(min(len(text), budget))]
        if text:
            budget -= len(text)
            yield doc, text
        if budget <= 0:
            return


def _cache_key(cfg: DataConfig, vocab_size: int, docs: list[_Doc]) -> tuple[str, dict]:
    text_hash, names = hashlib.sha256(), []
    n_chars = 0
    for doc, text in _iter_texts(docs, cfg.max_chars):
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


# --- building the cache ----------------------------------------------------------------------------


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


def _batches(docs: list[_Doc], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Lists of (piece, ends_document), ~_BATCH_CHARS of text each. Long documents are cut at
    newlines so that one huge file is never tokenized in one go: memory stays bounded."""
    batch, chars = [], 0
    for _, text in _iter_texts(docs, max_chars):
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
    tmp: Path, cfg: DataConfig, vocab_size: int, docs: list[_Doc], key: str, summary: dict
) -> None:
    t0 = time.perf_counter()
    pieces = (piece for batch in _batches(docs, cfg.max_chars) for piece, _ in batch)
    tok = _train_tokenizer(pieces, vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    dtype = np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")
    total = _encode_stream(tok, _batches(docs, cfg.max_chars), tmp / "stream.bin", dtype)
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
    docs = _stdlib_docs() if cfg.source == "stdlib" else _text_docs(list(cfg.paths))
    key, summary = _cache_key(cfg, vocab_size, docs)
    final = Path(os.path.expanduser(cfg.cache_dir)) / key[:16]
    if not _is_complete(final, key):
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock(final.parent / f".{final.name}.lock"):
            if not _is_complete(final, key):
                _publish(final, key, lambda tmp: _build_into(tmp, cfg, vocab_size, docs, key, summary))
    dataset = Dataset(final)
    if seq_len > 0:
        for split in _SPLIT_IDS:
            dataset._windows(split, seq_len)
    return dataset


# --- reading ---------------------------------------------------------------------------------------


def _seed_for(*values: int) -> int:
    # A stable hash (unlike Python's salted hash()) so every process and every resume agrees.
    packed = struct.pack(f"<{len(values)}Q", *(v % 2**64 for v in values))
    digest = hashlib.blake2b(packed, digest_size=16).digest()
    return int.from_bytes(digest, "little")


class Dataset:
    """A built cache: the tokenizer plus memory-mapped train/val token shards."""

    def __init__(self, path: Path) -> None:
        self.cache_path = Path(path)
        self.meta: dict = json.loads((self.cache_path / "meta.json").read_text())
        self.cache_key: str = self.meta["key"]
        self.tokenizer = Tokenizer.from_file(str(self.cache_path / "tokenizer.json"))
        self.vocab_size: int = self.meta["vocab_size"]  # actual size; can be below the requested one
        self.eot_id: int = self.meta["eot_id"]
        self.train_tokens: int = self.meta["train_tokens"]
        self.val_tokens: int = self.meta["val_tokens"]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards: dict[str, list[np.memmap]] = {
            split: [
                np.memmap(self.cache_path / f"{split}-{i:05d}.bin", dtype=dtype, mode="r", shape=(n,))
                for i, n in enumerate(counts)
            ]
            for split, counts in self.meta["shards"].items()
        }
        self._index: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        # EOT stays visible so samples show where the model thinks a document ends.
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _windows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Valid window starts per shard and their running total, for sampling uniformly over all."""
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if (split, seq_len) not in self._index:
            starts = np.array([max(0, len(s) - seq_len) for s in self.shards[split]], dtype=np.int64)
            if starts.sum() == 0:
                cfg, have = self.meta["config"], max(len(s) for s in self.shards[split])
                fixes = [f"raise data.max_chars (now {cfg['max_chars']}, 0 = no cap) or add text"]
                if split == "val":
                    fixes.append(f"raise data.val_fraction (now {cfg['val_fraction']})")
                if cfg["shard_tokens"] <= seq_len:
                    fixes.append(f"raise data.shard_tokens (now {cfg['shard_tokens']})")
                raise DataError(
                    f"corpus too small: the {split} split has {have} tokens in its largest shard but "
                    f"seq_len={seq_len} needs {seq_len + 1} — {', '.join(fixes)}, or lower seq_len"
                )
            self._index[(split, seq_len)] = (starts, np.cumsum(starts))
        return self._index[(split, seq_len)]

    def batch(
        self, split: str, step: int, micro_step: int, rank: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape [batch_size, seq_len]; y is x shifted left by one token.

        A pure function of its arguments. Windows are uniform over every start position of the
        split (so shards weigh by length) and never cross a shard end.
        """
        starts, cum = self._windows(split, seq_len)
        rng = np.random.default_rng(_seed_for(seed, _SPLIT_IDS[split], step, micro_step, rank))
        picks = rng.integers(0, cum[-1], size=batch_size)
        which = np.searchsorted(cum, picks, side="right")
        offsets = picks - (cum[which] - starts[which])
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(which.tolist(), offsets.tolist(), strict=True)):
            rows[i] = self.shards[split][s][o : o + seq_len + 1]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()
