"""data.dedup on a corpus with known duplicates: exact copies, near copies (a word or two changed), and
documents that merely share a topic, which must stay."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from greenrun import data
from greenrun.data import DataConfig, DataError, build, dedup

N_UNIQUE, N_EXACT, N_NEAR = 30, 6, 4


def _corpus(root: Path) -> tuple[Path, list[str]]:
    """30 unique documents of 120 random words; then 6 exact copies and 4 copies with one word changed
    (Jaccard similarity 111/121 = 0.92 over 5-word shingles); then 2 documents reusing half of another's
    words in another order (far below the threshold)."""
    rng = random.Random(7)
    vocab = [f"word{i}" for i in range(2000)]
    unique = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(N_UNIQUE)]
    exact = [unique[i] for i in range(N_EXACT)]
    near = []
    for i in range(N_EXACT, N_EXACT + N_NEAR):
        words = unique[i].split()
        words[60] = "CHANGED"
        near.append(" ".join(words))
    related = [" ".join(rng.sample(unique[20].split(), 60) + rng.sample(vocab, 60)) for _ in range(2)]
    texts = unique + exact + near + related
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    return root / "docs.jsonl", texts


def _cfg(tmp_path: Path, path: Path, **kw) -> DataConfig:
    kw = {"tokenizer": "bytes", "workers": 1, "max_chars": 0, "group_bytes": 4096} | kw
    return DataConfig(source="text", paths=[str(path)], cache_dir=str(tmp_path / "cache"), **kw)


def _docs(ds: data.Dataset) -> list[str]:
    stream = np.concatenate([np.asarray(s) for s in ds.shards["train"] + ds.shards["val"]])
    return ds.decode(stream.tolist()).split(data.EOT)[:-1]


def test_none_keeps_everything(tmp_path: Path) -> None:
    path, texts = _corpus(tmp_path / "corpus")
    ds = build(_cfg(tmp_path, path), 300)
    assert _docs(ds) == texts and ds.meta["dedup"]["removed_exact"] == 0


def test_exact_removes_the_copies_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, texts = _corpus(tmp_path / "corpus")
    with caplog.at_level("INFO", logger="greenrun"):
        ds = build(_cfg(tmp_path, path, dedup="exact"), 300)
    report = ds.meta["dedup"]
    assert (report["documents"], report["removed_exact"], report["removed_near"]) == (42, N_EXACT, 0)
    assert report["removed_bytes"] == sum(len(t.encode()) for t in texts[N_UNIQUE : N_UNIQUE + N_EXACT])
    assert _docs(ds) == texts[:N_UNIQUE] + texts[N_UNIQUE + N_EXACT :]
    assert report["examples"][0] == {
        "removed": f"docs.jsonl:{N_UNIQUE + 1}",
        "kept": "docs.jsonl:1",
        "why": "exact",
    }
    assert f"dedup=exact: removed {N_EXACT} of 42 documents" in caplog.text


def test_near_also_removes_near_copies_and_keeps_related_documents(tmp_path: Path) -> None:
    path, texts = _corpus(tmp_path / "corpus")
    ds = build(_cfg(tmp_path, path, dedup="near"), 300)
    report = ds.meta["dedup"]
    assert (report["removed_exact"], report["removed_near"]) == (N_EXACT, N_NEAR)
    assert _docs(ds) == texts[:N_UNIQUE] + texts[-2:]  # both related documents stay
    near = [e for e in report["examples"] if e["why"].startswith("near")]
    assert (
        near[0]["removed"] == f"docs.jsonl:{N_UNIQUE + N_EXACT + 1}"
        and near[0]["kept"] == f"docs.jsonl:{N_EXACT + 1}"
    )
    assert 0.85 < float(near[0]["why"].split("~")[1]) < 0.99


def test_a_stricter_threshold_keeps_the_near_copies(tmp_path: Path) -> None:
    path, _ = _corpus(tmp_path / "corpus")
    ds = build(_cfg(tmp_path, path, dedup="near", dedup_threshold=0.99), 300)
    assert (ds.meta["dedup"]["removed_exact"], ds.meta["dedup"]["removed_near"]) == (N_EXACT, 0)


def test_dedup_settings_enter_the_cache_key(tmp_path: Path) -> None:
    path, _ = _corpus(tmp_path / "corpus")
    keys = {
        build(_cfg(tmp_path, path, **kw), 300).cache_key
        for kw in ({}, {"dedup": "exact"}, {"dedup": "near"}, {"dedup": "near", "dedup_threshold": 0.9})
    }
    assert len(keys) == 4


def test_signatures_are_computed_once_per_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _corpus(tmp_path / "corpus")
    calls: list[int] = []
    real = dedup.signatures

    def counting(texts, num_perm, shingle):
        calls.append(len(texts))
        return real(texts, num_perm, shingle)

    monkeypatch.setattr(dedup, "signatures", counting)
    first = build(_cfg(tmp_path, path, dedup="near"), 300)
    signed = len(calls)
    assert signed == first.meta["files"][-1]["group"] + 1 > 1  # one call per group of the corpus
    build(_cfg(tmp_path, path, dedup="near", val_fraction=0.1), 300)  # a new cache, the same groups
    assert len(calls) == signed


def test_shingles_hash_the_same_in_every_process() -> None:
    a = dedup.shingle_hashes("The quick brown fox jumps over the lazy dog", 3)
    assert a.dtype == np.uint32 and len(a) == 7
    assert np.array_equal(a, dedup.shingle_hashes("the QUICK brown   fox jumps over the lazy dog", 3))
    assert len(dedup.shingle_hashes("two words", 5)) == 1 and len(dedup.shingle_hashes("   ", 5)) == 0


def test_dedup_problems_are_collected() -> None:
    problems = data.validate(
        DataConfig(dedup="fuzzy", dedup_threshold=0.0, dedup_num_perm=4, dedup_shingle=0)
    )
    assert "data.dedup: unknown value 'fuzzy'" in problems[0] and len(problems) == 4
    with pytest.raises(DataError, match="data.dedup"):
        build(DataConfig(dedup="fuzzy"), 300)
