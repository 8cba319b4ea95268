"""The token cache: records -> dedup -> tokenizer -> token shards (in parallel) -> an index, published atomically.

A complete cache is `<cache_dir>/<key[:16]>/`: tokenizer.json, shard-NNNNN.bin (hard links to the shard
store, shards.py) and meta.json, the index (index.py), written last: its presence marks the cache complete.
The key hashes the corpus text and every setting that changes the tokens or how they are cut; builders
(torchrun ranks) serialise on a lock, build in a temp dir and rename it into place. With data.cache_url a
cache missing here is first looked for in the bucket, and one built here is uploaded (s3cache.py).

Window scores for curriculum=difficulty live beside the shards (`cached_scores`): scores-<name>.npy plus a
JSON file written after it that marks it complete. Both are plain data: loading them never runs code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from greenrun.core.fs import TMP_PREFIX, atomic_write
from greenrun.data import dedup, index, s3cache, shards, sources, tokenizer
from greenrun.data.dataset import Dataset
from greenrun.data.shards import Plan
from greenrun.data.sources import CORPUS_KEYS, SOURCES, DataConfig, DataError, Source
from greenrun.data.tokenizer import EOT

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
    fcntl = None

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when text -> tokens changes, so old caches miss (the layout is index.LAYOUT)
SCORES_VERSION = 1  # bump when a window score or the tiling changes, so old score files miss
_STALE_S = 86_400  # temp files and build dirs older than this belong to a build that was killed


def validate(cfg: DataConfig, need_corpus: bool = True) -> list[str]:
    """Every problem with cfg that can be seen without reading the corpus. need_corpus=False: a resume whose
    token cache is here, where the corpus and tokenizer locations are not needed."""
    problems = sources.validate(cfg) + tokenizer.problems(cfg) + dedup.problems(cfg) + s3cache.problems(cfg)
    return [p for p in problems if need_corpus or not p.startswith(CORPUS_KEYS)]


def _cache_key(cfg: DataConfig, vocab_size: int, content: str, fixed: Tokenizer | None) -> str:
    # The first eight entries are the key of every cache built before the other settings existed: left
    # at their defaults, those caches (and the checkpoints that name them) keep their keys.
    vocab = vocab_size if fixed is None else 0  # a fixed tokenizer's ids do not depend on the model
    settings: list = [FORMAT_VERSION, tokenizers.__version__, cfg.source, cfg.max_chars, vocab]
    settings += [cfg.val_fraction, cfg.shard_tokens, content]
    extras: dict = {}
    if fixed is not None:
        extras["tokenizer"] = [cfg.tokenizer, tokenizer.digest(fixed)]
    if cfg.eot_token != EOT:
        extras["eot"] = cfg.eot_token
    if cfg.dedup != "none":
        extras["dedup"] = [cfg.dedup]
        if cfg.dedup == "near":
            extras["dedup"] += [cfg.dedup_threshold, cfg.dedup_num_perm, cfg.dedup_shingle, dedup.SEED]
    if extras:
        settings.append(extras)
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _plan(cfg: DataConfig, source: Source) -> Plan:
    plan = shards.plan(sources.records(cfg, source), cfg.group_bytes)
    if not plan.documents:
        raise DataError(source.empty(cfg))
    return plan


def _check_vocab(cfg: DataConfig, tok: Tokenizer, vocab_size: int) -> None:
    need = tokenizer.id_space(tok)
    if vocab_size < need:
        padded = -(-need // 64) * 64
        raise DataError(
            f"model.vocab_size={vocab_size} is smaller than the {need:,} ids of data.tokenizer={cfg.tokenizer}: "
            f"set model.vocab_size={need} or more (e.g. {padded}, a multiple of 64)"
        )


def _kept_texts(cfg: DataConfig, source: Source, kept: np.ndarray) -> Iterator[str]:
    for i, (_, text) in enumerate(sources.records(cfg, source)):
        if kept[i]:
            for piece, _ in shards.pieces(text):
                yield piece


def _names(cfg: DataConfig, source: Source, positions: list[int]) -> dict[int, str]:
    """The record names at `positions` (dedup's examples), read again up to the last one; a streamed
    corpus is not streamed again for them."""
    if not positions or source.identity(cfg) is not None:
        return {}
    wanted = set(positions)
    found = islice(enumerate(sources.records(cfg, source)), max(positions) + 1)
    return {i: name for i, (name, _) in found if i in wanted}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the store's file itself: no copy, no second disk's worth of tokens
    except OSError:
        shutil.copyfile(src, dst)


def _build_into(
    tmp: Path,
    cfg: DataConfig,
    source: Source,
    vocab_size: int,
    plan: Plan | None,
    key: str,
    fixed: Tokenizer | None,
) -> None:
    t0 = time.perf_counter()
    plan = plan or _plan(cfg, source)
    store = Path(os.path.expanduser(cfg.cache_dir)) / "shards"
    store.mkdir(parents=True, exist_ok=True)
    _sweep(store, TMP_PREFIX)
    kept, report = dedup.keep(cfg, plan, lambda: sources.records(cfg, source), store)
    positions = [e[k] for e in report.examples for k in ("removed", "kept")]
    dedup.name_examples(report, _names(cfg, source, positions))
    if cfg.dedup != "none":
        log.info(report.line())
    tok = fixed or tokenizer.option(cfg).train(cfg, _kept_texts(cfg, source, kept), vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    eot = tokenizer.eot_id(tok, cfg)
    dtype = shards.token_dtype(vocab_size if fixed is None else tokenizer.id_space(tok))
    digest = tokenizer.digest(tok)
    names = {
        g.index: shards.shard_name(digest, dtype, g, kept[g.first : g.first + g.count])
        for g in plan.groups
        if kept[g.first : g.first + g.count].any()
    }
    have = {i: info for i, name in names.items() if (info := shards.stored(store, name, dtype)) is not None}
    todo = set(names) - set(have)

    def jobs() -> Iterator[tuple[int, int, tuple]]:
        for g, batch in shards.grouped(sources.records(cfg, source), plan, todo):
            texts = [text for (_, text), k in zip(batch, kept[g.first : g.first + g.count], strict=True) if k]
            yield g.index, g.nbytes, (texts, str(store), names[g.index])

    workers = shards.worker_count(cfg.workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    setup = (tok.to_str(), cfg.eot_token, cfg.tokenizer == "bytes", dtype.str, threads)
    progress = shards.Progress("data: tokenising", sum(plan.groups[i].nbytes for i in todo))
    try:
        built = shards.run(shards.encode_group, jobs(), workers, progress, shards.init_encoder, setup)
    finally:
        seconds = progress.close()
    files = []
    for i in sorted(names):
        g, info = plan.groups[i], (have | built)[i]
        name = index.shard_file(len(files))
        _link(store / f"{names[i]}.bin", tmp / name)
        files.append({"name": name, "tokens": info["tokens"], "sha256": info["sha256"], "group": i})
        files[-1] |= {"documents": info["documents"], "records": g.count, "fingerprint": g.fingerprint}
        files[-1] |= {"store": names[i], "built": i in built}
    total = sum(f["tokens"] for f in files)
    train, val, segments = index.split_segments(
        [f["tokens"] for f in files], cfg.val_fraction, cfg.shard_tokens
    )
    if train < 1:
        raise DataError(f"corpus too small: {total} tokens — add text or raise data.max_chars")
    new_tokens = sum(built[i]["tokens"] for i in built)
    meta = {
        "format_version": FORMAT_VERSION,
        "layout": index.LAYOUT,
        "key": key,
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size() if fixed is None else tokenizer.id_space(tok),
        "requested_vocab_size": vocab_size,
        "eot_id": eot,
        "train_tokens": train,
        "val_tokens": val,
        "files": files,
        "segments": segments,
        "shards": {split: [sum(n for _, _, n in seg) for seg in segs] for split, segs in segments.items()},
        "tokenizer": {"kind": cfg.tokenizer, "sha256": digest, "sha256_file": index.sha256_of(tmp / "tokenizer.json")},
        "dedup": report.as_dict(),
        "config": {k: getattr(cfg, k) for k in ("max_chars", "val_fraction", "shard_tokens")},
        "sources": _summary(cfg, plan),
        "build": {"tokenized": sorted(built), "reused": len(have), "workers": workers, "tokens": new_tokens,
                  "tokens_per_s": round(new_tokens / max(seconds, 1e-9))},
        "build_seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    log.info(
        f"data: tokenised {len(built)} of {len(files)} shards ({len(have)} reused) into {total:,} tokens"
        + (f", {new_tokens / max(seconds, 1e-9):,.0f} tokens/s with {workers} worker(s)" if built else "")
    )
    with open(tmp / "meta.json", "w") as fh:  # written last: its presence marks a complete cache
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _summary(cfg: DataConfig, plan: Plan) -> dict:
    where = {"name": cfg.name, "split": cfg.split} if cfg.source == "hf" else {}
    return {"source": cfg.source, "paths": list(cfg.paths), **where, **plan.summary}


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


def _sweep(folder: Path, prefix: str) -> None:
    """Remove what killed builds left in `folder`: entries named `prefix`... older than _STALE_S."""
    cutoff = time.time() - _STALE_S
    for path in folder.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if path.lstat().st_mtime < cutoff:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _publish(final: Path, key: str, fill: Callable[[Path], None]) -> None:
    """Fill a private temp dir, then rename it into place: readers never see a half-built cache."""
    if final.exists():  # no valid meta.json: a deleted marker, a partial copy, a key collision
        shutil.rmtree(final, ignore_errors=True)
    _sweep(final.parent, ".build-")
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
    """The dataset for cfg, built and cached on first use (or fetched from data.cache_url).

    With seq_len > 0, a split too small for one window of seq_len + 1 tokens fails here, before training.
    """
    problems = validate(cfg)
    trains = not problems and tokenizer.option(cfg).trains
    if trains and vocab_size < 257:
        problems.append(f"vocab_size: a byte-level BPE needs >= 257 (256 bytes + EOT), got {vocab_size}")
    if problems:
        raise DataError("\n".join(problems))
    fixed = None if trains else tokenizer.option(cfg).load(cfg)
    if fixed is not None:
        tokenizer.eot_id(fixed, cfg)  # refused now, before the corpus is read, if it lacks the EOT token
        _check_vocab(cfg, fixed, vocab_size)
    source = SOURCES.get(cfg.source)()
    identity = source.identity(cfg)
    plan = None if identity is not None else _plan(cfg, source)
    key = _cache_key(cfg, vocab_size, identity if plan is None else plan.text_hash, fixed)
    final = Path(os.path.expanduser(cfg.cache_dir)) / key[:16]
    fetched = False
    if not _is_complete(final, key):
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock(final.parent / f".{final.name}.lock"):
            if not _is_complete(final, key):
                fetched = bool(cfg.cache_url) and s3cache.fetch(cfg, key, final)
            if not _is_complete(final, key):
                _publish(final, key, lambda tmp: _build_into(tmp, cfg, source, vocab_size, plan, key, fixed))
    dataset = Dataset(final)
    if cfg.cache_url and not fetched:
        s3cache.push(cfg, dataset)
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
