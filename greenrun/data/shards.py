"""Token shards: the corpus cut into groups of records, each tokenised once, in parallel, into one file.

A group ends after a record with probability len(record) / data.group_bytes, drawn from the record's own
digest (content-defined chunking): where a group ends depends only on the records at that place, so editing
one file moves no other boundary, and only the groups holding changed records are tokenised again.

A shard file is named by everything its tokens are a function of (the tokenizer, the group's texts, which of
its records dedup kept) and lives in <cache_dir>/shards/, shared by every cache built from it. It is written
under a temp name, fsynced and renamed; its sidecar JSON, written the same way after it, marks it complete.
An interrupted build therefore leaves finished shards (reused next time) and nothing that looks finished
but is not.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from greenrun.core import output
from greenrun.core.fs import atomic_write
from greenrun.data.sources import DataError

log = logging.getLogger(__name__)

DIGEST = 16  # bytes of blake2b per record: what dedup compares and a group's fingerprint is made of
SHARD_FORMAT = 1  # bump when the bytes of a shard for the same inputs change, so old shards miss
_PIECE_CHARS = 1_000_000  # longest text handed to the tokenizer at once
_BATCH_CHARS = 4_000_000  # text per encode_batch call: enough to keep the tokenizer's threads busy
_MAX_GROUP = 4  # a group is cut at this many times group_bytes whatever the draws: bounds a task's memory
_IN_FLIGHT = 2  # tasks queued per worker: enough to keep it busy, few enough to bound the text held here


@dataclass
class Group:
    index: int
    first: int  # position of its first record in the corpus
    count: int  # records in it
    nbytes: int  # UTF-8 bytes of their text
    fingerprint: str  # hash of its records' digests: its tokens are a function of this and the tokenizer


@dataclass
class Plan:
    groups: list[Group]
    digests: bytes  # DIGEST bytes per record, in corpus order
    sizes: np.ndarray  # UTF-8 bytes of each record, in corpus order
    text_hash: str  # sha256 over every record's name, length and text: the cache key's view of the corpus
    summary: dict  # documents, chars, first and last record names

    @property
    def documents(self) -> int:
        return len(self.digests) // DIGEST


def record_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST).digest()


def _ends_group(digest: bytes, nbytes: int, group_bytes: int) -> bool:
    return int.from_bytes(digest[:8], "little") < nbytes / group_bytes * 2**64


def plan(records: Iterable[tuple[str, str]], group_bytes: int) -> Plan:
    """One pass over the corpus: every record's digest, the groups, and the hash the cache key uses."""
    text_hash, digests, groups, sizes = hashlib.sha256(), bytearray(), [], array("Q")
    first = count = nbytes = chars = 0
    names = ["", ""]
    fingerprint = hashlib.blake2b(digest_size=16)
    for name, text in records:
        data = text.encode("utf-8")
        # Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
        text_hash.update(f"{name}\0{len(data)}\0".encode() + data)
        digest = hashlib.blake2b(data, digest_size=DIGEST).digest()
        digests += digest
        sizes.append(len(data))
        fingerprint.update(digest)
        count, nbytes, chars = count + 1, nbytes + len(data), chars + len(text)
        names = [names[0] or name, name]
        if _ends_group(digest, len(data), group_bytes) or nbytes >= _MAX_GROUP * group_bytes:
            groups.append(Group(len(groups), first, count, nbytes, fingerprint.hexdigest()))
            first, count, nbytes = first + count, 0, 0
            fingerprint = hashlib.blake2b(digest_size=16)
    if count:
        groups.append(Group(len(groups), first, count, nbytes, fingerprint.hexdigest()))
    summary = {"documents": first + count, "chars": chars, "first": names[0], "last": names[1]}
    return Plan(groups, bytes(digests), np.frombuffer(sizes, dtype=np.uint64), text_hash.hexdigest(), summary)


def grouped(
    records: Iterable[tuple[str, str]], plan: Plan, wanted: set[int] | None = None
) -> Iterator[tuple[Group, list[tuple[str, str]]]]:
    """The records again, a group at a time (only `wanted` ones, if given), checked against the plan: the
    cache key was made from the plan's texts, so a file edited since then must not slip into the tokens."""
    it = iter(records)
    for group in plan.groups:
        if wanted is not None and group.index not in wanted:
            deque(islice(it, group.count), maxlen=0)
            continue
        batch = list(islice(it, group.count))
        seen = b"".join(record_digest(text) for _, text in batch)
        if seen != plan.digests[group.first * DIGEST : (group.first + group.count) * DIGEST]:
            where = batch[0][0] if batch else "the end"
            raise DataError(f"the corpus changed while it was being read (near {where}): run again")
        yield group, batch


def pieces(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document): a long document is cut at newlines so that one huge file is never tokenized
    in one go and memory stays bounded."""
    start = 0
    while start < len(text):
        end = len(text)
        if end - start > _PIECE_CHARS:
            end = text.rfind("\n", start, start + _PIECE_CHARS) + 1 or start + _PIECE_CHARS
        yield text[start:end], end == len(text)
        start = end


def token_dtype(id_space: int) -> np.dtype:
    return np.dtype("<u2") if id_space <= 65535 else np.dtype("<u4")


# --- the shard store -------------------------------------------------------------------------------------


def shard_name(tokenizer_digest: str, dtype: np.dtype, group: Group, kept: np.ndarray) -> str:
    """The store's name for a group's tokens: a hash of everything they are a function of."""
    mask = "all" if kept.all() else hashlib.sha256(np.packbits(kept).tobytes()).hexdigest()
    inputs = [SHARD_FORMAT, _PIECE_CHARS, tokenizer_digest, dtype.name, group.fingerprint, mask]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:32]


def stored(store: Path, name: str, dtype: np.dtype) -> dict | None:
    """The sidecar of a complete shard in the store, or None (absent, torn, or not matching its file)."""
    try:
        info = json.loads((store / f"{name}.json").read_text())
        size = (store / f"{name}.bin").stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or size != info.get("tokens", -1) * dtype.itemsize:
        return None
    return info


# --- tokenising, in this process or in workers -----------------------------------------------------------

# The tokenizer and how to write its ids, set by init_encoder. Per thread, not just per process: builds of
# two caches may run in one process's threads (workers=1), and a worker runs its tasks in its init's thread.
_LOCAL = threading.local()


def init_encoder(tokenizer_json: str, eot: str, as_bytes: bool, dtype: str, threads: int = 0) -> None:
    """Set up a tokenising process (a worker, or this one for workers=1)."""
    if threads:
        # Each worker gets its share of the cores; set before the tokenizer's thread pool first starts.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    tok = Tokenizer.from_str(tokenizer_json)
    _LOCAL.state = {"tok": tok, "eot": eot, "eot_id": tok.token_to_id(eot), "as_bytes": as_bytes}
    _LOCAL.state["dtype"] = np.dtype(dtype)


def _ids(texts: list[str]) -> Iterator[np.ndarray]:
    """Every document's tokens, each followed by the end-of-text id (GPT-2 style)."""
    state = _LOCAL.state
    end = np.array([state["eot_id"]], dtype=state["dtype"])
    batch, chars = [], 0
    for text in texts:
        for piece, ends in pieces(text):
            batch.append((piece, ends))
            chars += len(piece)
            if chars >= _BATCH_CHARS:
                yield from _encode(state, batch, end)
                batch, chars = [], 0
    yield from _encode(state, batch, end)


def _encode(state: dict, batch: list, end: np.ndarray) -> Iterator[np.ndarray]:
    tok, dtype, eot = state["tok"], state["dtype"], state["eot"]
    if state["as_bytes"]:
        # data.tokenizer=bytes maps byte b to id b: numpy does in one copy what the tokenizer does per char.
        # A piece holding the end-of-text string itself goes through the tokenizer, which makes it one id.
        for piece, ends in batch:
            if eot in piece:
                ids = np.array(tok.encode(piece, add_special_tokens=False).ids, dtype=dtype)
            else:
                ids = np.frombuffer(piece.encode("utf-8"), dtype=np.uint8).astype(dtype)
            yield np.concatenate([ids, end]) if ends else ids
        return
    encoded = tok.encode_batch_fast([piece for piece, _ in batch], add_special_tokens=False)
    for enc, (_, ends) in zip(encoded, batch, strict=True):
        yield np.concatenate([enc.ids, end]).astype(dtype) if ends else np.asarray(enc.ids, dtype=dtype)


def encode_group(texts: list[str], store: str, name: str) -> dict:
    """Tokenise one group's kept texts into the store as `name`.bin, then its sidecar: the marker."""
    digest, total = hashlib.sha256(), 0

    def fill(fh: Any) -> None:
        nonlocal total
        for ids in _ids(texts):
            data = ids.tobytes()
            digest.update(data)
            fh.write(data)
            total += ids.size

    atomic_write(Path(store) / f"{name}.bin", fill)
    info = {"tokens": total, "sha256": digest.hexdigest(), "documents": len(texts)}
    atomic_write(Path(store) / f"{name}.json", json.dumps(info))
    return info


def worker_count(requested: int, jobs: int) -> int:
    """data.workers for `jobs` tasks. Automatic (0): a process per core from 3 cores on; on 1 or 2 cores this
    process alone, whose tokenizer threads use both (measured faster there than two processes)."""
    cores = os.cpu_count() or 1
    return max(1, min(requested or (cores if cores > 2 else 1), jobs))


def run(
    fn: Callable[..., Any],
    jobs: Iterator[tuple[int, int, tuple]],
    workers: int,
    progress: Progress,
    init: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> dict[int, Any]:
    """{job id: fn(*args)} for every (id, weight, args) of `jobs`, in `workers` spawned processes (1: here).

    Spawned, not forked: a fork would copy this process's threads' locks (uploaders, loggers) mid-use."""
    results: dict[int, Any] = {}
    if workers <= 1:
        if init is not None:
            init(*initargs)
        for job, weight, args in jobs:
            results[job] = fn(*args)
            progress.advance(weight, results[job])
        return results
    context = multiprocessing.get_context("spawn")
    pool = futures.ProcessPoolExecutor(workers, mp_context=context, initializer=init, initargs=initargs)
    pending: dict[futures.Future, tuple[int, int]] = {}
    try:
        for job, weight, args in jobs:
            while len(pending) >= _IN_FLIGHT * workers:
                _collect(pending, results, progress, futures.FIRST_COMPLETED)
            pending[pool.submit(fn, *args)] = (job, weight)
        while pending:
            _collect(pending, results, progress, futures.ALL_COMPLETED)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _collect(pending: dict, results: dict, progress: Progress, when: str) -> None:
    done, _ = futures.wait(pending, return_when=when)
    for future in done:
        job, weight = pending.pop(future)
        results[job] = future.result()  # a worker's exception is raised here, in this process
        progress.advance(weight, results[job])


class Progress:
    """A rich progress bar over text bytes on a terminal; elsewhere a log line every _LOG_EVERY seconds."""

    _LOG_EVERY = 10.0

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.tokens = label, total, 0, 0
        self.t0 = self._last = time.monotonic()
        self.bar: Any = None
        if output.console.is_terminal and total:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())
            self.bar = Progress(*columns, console=output.console, transient=True)
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def advance(self, nbytes: int, result: Any = None) -> None:
        self.done += nbytes
        if isinstance(result, dict):
            self.tokens += result.get("tokens", 0)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif time.monotonic() - self._last >= self._LOG_EVERY:
            self._last = time.monotonic()
            log.info(f"{self.label}: {self.done / max(self.total, 1):.0%} of {self.total / 1e6:,.1f} MB")

    def close(self) -> float:
        """Seconds since the start."""
        if self.bar is not None:
            self.bar.stop()
        return time.monotonic() - self.t0
