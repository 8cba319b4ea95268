"""Deduplication (data.dedup): which records to keep, and a report of what was removed and why.

The first occurrence always stays; a later record goes when it is
  exact: the same text as an earlier one (the same 16-byte blake2b digest), or
  near:  exact, or its MinHash signature finds, through datasketch's LSH index, an earlier kept record
         whose estimated Jaccard similarity is >= data.dedup_threshold. The sets compared are a document's
         shingles: every run of data.dedup_shingle consecutive lower-cased words.
Signatures are computed in the tokeniser's worker processes and kept in the shard store per group, so a
rebuild after an edit signs only the changed groups. The LSH index holds every kept signature in this
process's memory (about 4 * num_perm bytes plus the index's own overhead per document): near suits corpora
up to a few million documents; exact costs 16 bytes per document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from greenrun.core.checks import choice
from greenrun.core.fs import atomic_write
from greenrun.data import shards
from greenrun.data.shards import DIGEST, Plan
from greenrun.data.sources import DEDUP, DataConfig

log = logging.getLogger(__name__)

SEED = 1  # datasketch's permutation seed: signatures compare only under one seed
_EXAMPLES = 5  # removed records the report names, per reason
_LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative) weights datasketch picks its bands with
_MIX = np.uint64(0x9E3779B1)  # odd multiplier folding a shingle's word hashes into one 32-bit hash


def problems(cfg: DataConfig) -> list[str]:
    found = choice("data.dedup", cfg.dedup, DEDUP)
    if not 0.0 < cfg.dedup_threshold <= 1.0:
        found.append(f"data.dedup_threshold: a Jaccard similarity in (0, 1], got {cfg.dedup_threshold}")
    if cfg.dedup_num_perm < 16:
        found.append(f"data.dedup_num_perm: must be >= 16 (128 is usual), got {cfg.dedup_num_perm}")
    if cfg.dedup_shingle < 1:
        found.append(f"data.dedup_shingle: words per shingle, must be >= 1, got {cfg.dedup_shingle}")
    return found


@dataclass
class Report:
    mode: str
    documents: int = 0
    removed_exact: int = 0
    removed_near: int = 0
    removed_bytes: int = 0
    examples: list[dict] = field(default_factory=list)  # {"removed", "kept", "why"} with record positions

    def as_dict(self) -> dict:
        return self.__dict__.copy()

    def line(self) -> str:
        removed = self.removed_exact + self.removed_near
        share = removed / max(self.documents, 1)
        return (
            f"dedup={self.mode}: removed {removed:,} of {self.documents:,} documents ({share:.1%}, "
            f"{self.removed_bytes / 1e6:,.2f} MB of text): {self.removed_exact:,} exact copies, "
            f"{self.removed_near:,} near-duplicates"
        )


def keep(
    cfg: DataConfig, plan: Plan, records: Callable[[], Iterable[tuple[str, str]]], store: Path
) -> tuple[np.ndarray, Report]:
    """(a bool per record, True = kept; the report). `records` re-reads the corpus for near signatures."""
    report = Report(cfg.dedup, documents=plan.documents)
    kept = np.ones(plan.documents, dtype=bool)
    if cfg.dedup == "none" or not plan.documents:
        return kept, report
    firsts = _first_copies(plan)
    exact = firsts != np.arange(plan.documents)
    kept &= ~exact
    report.removed_exact = int(exact.sum())
    for i in np.flatnonzero(exact)[:_EXAMPLES].tolist():
        report.examples.append({"removed": i, "kept": int(firsts[i]), "why": "exact"})
    if cfg.dedup == "near":
        signatures = _signatures(cfg, plan, records, kept, store)
        for i, j, similarity in _near(cfg, signatures, kept):
            kept[i] = False
            report.removed_near += 1
            if report.removed_near <= _EXAMPLES:
                report.examples.append({"removed": i, "kept": j, "why": f"near, Jaccard ~{similarity:.2f}"})
    report.removed_bytes = int(plan.sizes[~kept].sum())
    return kept, report


def _first_copies(plan: Plan) -> np.ndarray:
    """For every record, the position of the first record with the same digest."""
    digests = np.frombuffer(plan.digests, dtype=f"V{DIGEST}")
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


# --- near: signatures and the LSH index --------------------------------------------------------------


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """A 32-bit hash per run of n consecutive lower-cased words (all of them when fewer than n)."""
    words = np.array([zlib.crc32(w.encode()) for w in text.lower().split()], dtype=np.uint64)
    if len(words) == 0:
        return words.astype(np.uint32)
    n = min(n, len(words))
    hashes = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for j in range(n):
        hashes = (hashes * _MIX + words[j : len(words) - n + 1 + j]) & np.uint64(0xFFFFFFFF)
    return np.unique(hashes).astype(np.uint32)


def _identity(value: np.uint32) -> np.uint32:
    return value  # shingle_hashes already hashed each shingle


def signatures(texts: list[str], num_perm: int, shingle: int) -> np.ndarray:
    """uint32 [len(texts), num_perm]: each text's MinHash under datasketch's permutations (seed SEED)."""
    from datasketch import MinHash

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for i, text in enumerate(texts):
        sketch = MinHash(num_perm=num_perm, seed=SEED, hashfunc=_identity)
        sketch.update_batch(shingle_hashes(text, shingle))
        out[i] = sketch.hashvalues
    return out


def _signature_name(cfg: DataConfig, fingerprint: str, kept: np.ndarray) -> str:
    inputs = [fingerprint, np.packbits(kept).tobytes().hex(), cfg.dedup_num_perm, cfg.dedup_shingle, SEED]
    return "minhash-" + hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:32] + ".npy"


def _signatures(
    cfg: DataConfig,
    plan: Plan,
    records: Callable[[], Iterable[tuple[str, str]]],
    kept: np.ndarray,
    store: Path,
) -> dict[int, np.ndarray]:
    """{group index: signatures of its exactly-unique records}, from the store or computed in workers."""
    found: dict[int, np.ndarray] = {}
    for g in plan.groups:
        try:
            sig = np.load(store / _signature_name(cfg, g.fingerprint, kept[g.first : g.first + g.count]))
        except (OSError, ValueError):
            continue
        if sig.shape == (int(kept[g.first : g.first + g.count].sum()), cfg.dedup_num_perm):
            found[g.index] = sig
    wanted = {g.index for g in plan.groups} - set(found)

    def jobs() -> Iterator[tuple[int, int, tuple]]:
        for g, batch in shards.grouped(records(), plan, wanted):
            mask = kept[g.first : g.first + g.count]
            texts = [text for (_, text), k in zip(batch, mask, strict=True) if k]
            yield g.index, g.nbytes, (texts, cfg.dedup_num_perm, cfg.dedup_shingle)

    total = sum(g.nbytes for g in plan.groups if g.index in wanted)
    progress = shards.Progress("dedup: MinHash", total)
    try:
        made = shards.run(signatures, jobs(), shards.worker_count(cfg.workers, len(wanted)), progress)
    finally:
        progress.close()
    for index, sig in made.items():
        g = plan.groups[index]
        name = _signature_name(cfg, g.fingerprint, kept[g.first : g.first + g.count])
        atomic_write(store / name, lambda fh, sig=sig: np.save(fh, sig, allow_pickle=False))
    return found | made


def _near(
    cfg: DataConfig, signatures: dict[int, np.ndarray], kept: np.ndarray
) -> Iterator[tuple[int, int, float]]:
    """(record, the earlier kept record it nearly duplicates, estimated Jaccard), in corpus order."""
    from datasketch import LeanMinHash, MinHashLSH

    # Weighted for recall: the index only proposes candidates, and the full signatures below reject the
    # false ones, so a missed near-duplicate costs more than a candidate too many.
    lsh = MinHashLSH(threshold=cfg.dedup_threshold, num_perm=cfg.dedup_num_perm, weights=_LSH_WEIGHTS)
    held: dict[int, np.ndarray] = {}
    positions = np.flatnonzero(kept)
    rows = np.concatenate([signatures[k] for k in sorted(signatures)]) if signatures else np.zeros((0, 0))
    for position, row in zip(positions.tolist(), rows, strict=True):
        sketch = LeanMinHash(seed=SEED, hashvalues=row, scheme="affine32")
        # The index proposes candidates band by band; the full signatures decide, so a chance band
        # collision below the threshold removes nothing.
        best = max(((float(np.mean(held[c] == row)), c) for c in lsh.query(sketch)), default=(0.0, -1))
        if best[0] >= cfg.dedup_threshold:
            yield position, best[1], best[0]
        else:
            lsh.insert(position, sketch)
            held[position] = row


def name_examples(report: Report, names: dict[int, str]) -> None:
    """Replace the examples' record positions by their names, where known."""
    for example in report.examples:
        for key in ("removed", "kept"):
            example[key] = names.get(example[key], f"record {example[key]}")
