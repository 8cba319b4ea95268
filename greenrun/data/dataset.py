"""A built token cache, read back: the tokenizer plus memory-mapped shards, and batches from them.

Batches are a pure function of (seed, split, step, micro_step, rank), so a resumed run needs no iterator
state.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from greenrun.data.sources import DataError

SPLIT_IDS = {"train": 0, "val": 1}  # part of every batch's seed, so the two splits never share one


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
        self, split: str, step: int, micro_step: int, rank: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape [batch_size, seq_len]; y is x shifted left by one token.

        A pure function of its arguments. Windows are uniform over every start position of the
        split (so shards weigh by length) and never cross a shard end.
        """
        starts, cum = self._windows(split, seq_len)
        rng = np.random.default_rng(_seed_for(seed, SPLIT_IDS[split], step, micro_step, rank))
        picks = rng.integers(0, cum[-1], size=batch_size)
        which = np.searchsorted(cum, picks, side="right")
        offsets = picks - (cum[which] - starts[which])
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(which.tolist(), offsets.tolist(), strict=True)):
            rows[i] = self.shards[split][s][o : o + seq_len + 1]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()
