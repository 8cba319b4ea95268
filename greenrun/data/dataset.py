"""A built token cache, read back: the tokenizer plus memory-mapped shards, and batches from them.

Batches are a pure function of (seed, split, step, slot), so a resumed run needs no iterator state. A slot
numbers one micro-batch of an optimizer step's global batch (`global_slot`): what a step trains on is then the
same on any number of processes, and a run checkpointed on N processes resumes exactly on M.

For curriculum=difficulty the train split is also cut into a fixed tiling of windows, each scored once
(`length_scores`, `rarity_scores`); batches then draw from a pool of those windows instead of any start.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from greenrun.data import index
from greenrun.data.sources import DataError

if TYPE_CHECKING:
    import torch

SPLIT_IDS = {"train": 0, "val": 1}  # part of every batch's seed, so the two splits never share one


def _seed_for(*values: int) -> int:
    # A stable hash (unlike Python's salted hash()) so every process and every resume agrees.
    packed = struct.pack(f"<{len(values)}Q", *(v % 2**64 for v in values))
    digest = hashlib.blake2b(packed, digest_size=16).digest()
    return int.from_bytes(digest, "little")


def _slot_seed(seed: int, split: str, step: int, slot: int) -> int:
    # The trailing 0 is where the rank went before slots: with it, slot k hashes as (micro k, rank 0) did.
    return _seed_for(seed, SPLIT_IDS[split], step, slot, 0)


def global_slot(micro: int, rank: int, world: int) -> int:
    """The global batch's micro-batch that micro-step `micro` of process `rank` (of `world`) trains on.

    Micro-step m of every process is the m-th round of slots, `micro * world + rank`: a step's slots are
    0 .. accum * world - 1 however the global batch is split into accumulation and processes, so 2 processes
    x 2 micro-steps and 1 x 4 train on the same sequences (the rule needs no accumulation count). A single
    process (world 1, rank 0) has slot = micro, the index it always drew by: its batches, and the exact
    resume of every run written before slots, are unchanged.
    """
    return micro * world + rank


def _split(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of windows of seq_len + 1 tokens: the targets are the inputs shifted by one.

    The copies are numpy's: torch would spread a copy this size over its intra-op threads, which on a busy
    machine made one micro-batch take milliseconds instead of microseconds.
    """
    import torch  # here, not at the top: tokeniser worker processes import this package, never torch

    return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(
        np.ascontiguousarray(rows[:, 1:])
    )


class Joined:
    """A segment spanning several shard files, read like one array: `len`, slices and np.asarray copy only
    what a read asks for, and a read inside one file is a view of its memory map."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts]).tolist()
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        first = bisect.bisect_right(self.starts, start) - 1
        if stop <= self.starts[first + 1]:
            base = self.starts[first]
            return self.parts[first][start - base : stop - base : step]
        reads, at = [], start
        for i in range(first, len(self.parts)):
            if at >= stop:
                break
            lo, hi = at - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            reads.append(self.parts[i][lo:hi])
            at = self.starts[i] + hi
        return np.concatenate(reads)[::step]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)


class Dataset:
    """A built cache: the tokenizer plus memory-mapped train/val token segments."""

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
        self.shards: dict[str, list[Any]] = {}  # per split, its segments: memory maps (or Joined)
        if self.meta.get("layout", 1) < index.LAYOUT:
            self.shards = {
                split: [
                    np.memmap(self.cache_path / f"{split}-{i:05d}.bin", dtype=dtype, mode="r", shape=(n,))
                    for i, n in enumerate(counts)
                ]
                for split, counts in self.meta["shards"].items()
            }
        else:
            maps = [
                np.memmap(self.cache_path / f["name"], dtype=dtype, mode="r", shape=(f["tokens"],))
                for f in self.meta["files"]
            ]
            for split, segments in self.meta["segments"].items():
                views = [[maps[f][o : o + n] for f, o, n in pieces] for pieces in segments]
                self.shards[split] = [v[0] if len(v) == 1 else Joined(v) for v in views]
        self._index: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._tiles: dict[int, np.ndarray] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        # EOT stays visible so samples show where the model thinks a document ends.
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def check_fits(self, seq_len: int) -> None:
        """Raise DataError, naming the knobs to turn, when a split is too small for one window."""
        for split in SPLIT_IDS:
            self._windows(split, seq_len)

    def _windows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Valid window starts per shard and their running total, for sampling uniformly over all."""
        if split not in SPLIT_IDS:
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
        self, split: str, step: int, slot: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape [batch_size, seq_len]; y is x shifted left by one token.

        A pure function of its arguments (`slot`: which micro-batch of the global batch, `global_slot`).
        Windows are uniform over every start position of the split (so shards weigh by length) and never
        cross a shard end.
        """
        starts, cum = self._windows(split, seq_len)
        rng = np.random.default_rng(_slot_seed(seed, split, step, slot))
        picks = rng.integers(0, cum[-1], size=batch_size)
        which = np.searchsorted(cum, picks, side="right")
        offsets = picks - (cum[which] - starts[which])
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(which.tolist(), offsets.tolist(), strict=True)):
            rows[i] = self.shards[split][s][o : o + seq_len + 1]
        return _split(rows)

    # --- the fixed tiling of the train split (curriculum=difficulty) -----------------------------------

    def tiles(self, seq_len: int) -> np.ndarray:
        """Windows per train shard, as a running total (window ids are 0 .. tiles[-1] - 1, shard by shard).

        Window j of a shard holds its tokens [j * seq_len, j * seq_len + seq_len + 1): neighbours share one
        token, so every token after a shard's first is a target exactly once, and no window crosses a shard.
        """
        if seq_len not in self._tiles:
            counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards["train"]]
            self._tiles[seq_len] = np.cumsum(np.array(counts, dtype=np.int64))
        return self._tiles[seq_len]

    def tile_starts(self, seq_len: int) -> np.ndarray:
        """Each window's first token, counted from the start of the whole train split."""
        cum = self.tiles(seq_len)
        counts = np.diff(cum, prepend=0)
        shard_at = np.cumsum([0] + [len(s) for s in self.shards["train"]])[:-1]
        which = np.repeat(np.arange(len(cum)), counts)
        local = np.arange(int(cum[-1]) if len(cum) else 0) - (cum[which] - counts[which])
        return shard_at[which] + local * seq_len

    def pool_batch(
        self,
        pool: np.ndarray,
        step: int,
        slot: int,
        batch_size: int,
        seq_len: int,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) as `batch` gives them, but each row a window of the train tiling drawn uniformly from
        `pool` (window ids). A pure function of its arguments, so a resumed run draws the same rows."""
        rng = np.random.default_rng(_slot_seed(seed, "train", step, slot))
        return _split(self.tile_rows(pool[rng.integers(0, len(pool), size=batch_size)], seq_len))

    def tile_rows(self, ids: np.ndarray, seq_len: int) -> np.ndarray:
        """The tokens of the windows `ids` of the train tiling: int64 [len(ids), seq_len + 1]."""
        cum = self.tiles(seq_len)
        which = np.searchsorted(cum, ids, side="right")
        offsets = (ids - (cum[which] - np.diff(cum, prepend=0)[which])) * seq_len
        rows = np.empty((len(ids), seq_len + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(which.tolist(), offsets.tolist(), strict=True)):
            rows[i] = self.shards["train"][s][o : o + seq_len + 1]
        return rows


# --- window scores: one number per window of the train tiling, higher = harder ---------------------------

_ROWS = 1 << 14  # windows scored per numpy pass: bounds the temporary arrays, not the result


def length_scores(ds: Dataset, seq_len: int) -> np.ndarray:
    """The length, in tokens, of the document each token of a window sits in, averaged over the window's
    seq_len + 1 tokens: a window inside one document scores that document's length.

    Documents end at an EOT token (counted as the last token of the document it ends) and may span shards;
    the split's last document may lack its EOT (the val split starts there).
    """
    sizes = [len(s) for s in ds.shards["train"]]
    shard_at = np.cumsum([0] + sizes)
    eots = [
        np.flatnonzero(np.asarray(s) == ds.eot_id) + at
        for s, at in zip(ds.shards["train"], shard_at[:-1].tolist(), strict=True)
    ]
    ends = np.concatenate([*eots, np.zeros(0, dtype=np.int64)]) + 1
    total = int(shard_at[-1])
    if len(ends) == 0 or ends[-1] != total:
        ends = np.append(ends, total)
    starts = np.concatenate([[0], ends[:-1]])
    lengths = ends - starts
    # F(x) = sum over the tokens before position x of their document's length: piecewise linear in x.
    before = np.concatenate([[0], np.cumsum(lengths * lengths)[:-1]])

    def below(x: np.ndarray) -> np.ndarray:
        d = np.minimum(np.searchsorted(ends, x, side="right"), len(ends) - 1)
        return before[d] + (x - starts[d]) * lengths[d]

    first = ds.tile_starts(seq_len)
    return (below(first + seq_len + 1) - below(first)) / (seq_len + 1)


def rarity_scores(ds: Dataset, seq_len: int) -> np.ndarray:
    """Mean token rarity of each window: the mean over its seq_len + 1 tokens of -log(unigram frequency),
    the frequencies counted over the whole train split."""
    counts = np.zeros(ds.vocab_size, dtype=np.int64)
    for shard in ds.shards["train"]:
        for lo in range(0, len(shard), _ROWS * 64):
            counts += np.bincount(shard[lo : lo + _ROWS * 64], minlength=ds.vocab_size)[: ds.vocab_size]
    with np.errstate(divide="ignore"):
        cost = np.where(counts > 0, -np.log(counts / counts.sum()), 0.0)  # 0: a token the split never holds
    cum, out = ds.tiles(seq_len), []
    for shard, n in zip(ds.shards["train"], np.diff(cum, prepend=0).tolist(), strict=True):
        for r0 in range(0, n, _ROWS):
            r1 = min(n, r0 + _ROWS)
            body = cost[shard[r0 * seq_len : r1 * seq_len]].reshape(r1 - r0, seq_len).sum(axis=1)
            last = cost[shard[(r0 + 1) * seq_len : r1 * seq_len + 1 : seq_len]]  # each window's extra token
            out.append((body + last) / (seq_len + 1))
    return np.concatenate(out) if out else np.zeros(0)
