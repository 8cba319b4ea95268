"""greenrun.data: corpus errors, the cache's life cycle, and batches as a pure function."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from greenrun import data
from greenrun.data import DataConfig, DataError, build, cache, shards, sources, tokenizer


def _write_corpus(root: Path, n_files: int = 3, lines: int = 300, salt: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        body = "".join(f"def f{f}_{i}(x):\n    return x * {i} + {f}  # {salt}\n" for i in range(lines))
        (root / f"doc{f}.txt").write_text(body)
    return root


def _cfg(tmp_path: Path, corpus: Path, **kw) -> DataConfig:
    kw = {"paths": [str(corpus / "*.txt")], "max_chars": 0} | kw
    return DataConfig(source="text", cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> data.Dataset:
    tmp = tmp_path_factory.mktemp("ds")
    return build(_cfg(tmp, _write_corpus(tmp / "corpus"), shard_tokens=700), 320)


def _count_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = tokenizer.Bpe.train

    def counting(self, cfg, texts, vocab_size):
        calls.append(vocab_size)
        return real(self, cfg, texts, vocab_size)

    monkeypatch.setattr(tokenizer.Bpe, "train", counting)
    return calls


# --- batches ---------------------------------------------------------------------------------------


def test_batch_is_a_pure_function_and_y_is_x_shifted(ds: data.Dataset) -> None:
    x, y = ds.batch("train", step=5, slot=1, batch_size=8, seq_len=32, seed=1337)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = ds.batch("train", step=5, slot=1, batch_size=8, seq_len=32, seed=1337)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    # A fresh Dataset over the same cache (a resumed process) must agree too.
    fresh = data.Dataset(ds.cache_path).batch("train", 5, 1, 8, 32, 1337)
    assert torch.equal(x, fresh[0])


@pytest.mark.parametrize(
    "change",
    [{"step": 6}, {"slot": 2}, {"seed": 1338}, {"split": "val"}],
)
def test_batch_differs_when_any_argument_changes(ds: data.Dataset, change: dict) -> None:
    args = {
        "split": "train",
        "step": 5,
        "slot": 1,
        "batch_size": 8,
        "seq_len": 32,
        "seed": 1337,
    }
    x, _ = ds.batch(**args)
    x2, _ = ds.batch(**(args | change))
    assert not torch.equal(x, x2)


def test_windows_never_cross_a_shard_end_and_shards_hold_the_whole_stream(ds: data.Dataset) -> None:
    assert len(ds.shards["train"]) > 2  # shard_tokens=700 forces several
    assert all(len(s) <= 700 for s in ds.shards["train"] + ds.shards["val"])
    seq = 48
    for split in ("train", "val"):
        windows = [np.lib.stride_tricks.sliding_window_view(np.asarray(s), seq + 1) for s in ds.shards[split]]
        for step in range(20):
            x, y = ds.batch(split, step, 0, 4, seq, seed=0)
            for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
                assert any((w == row).all(axis=1).any() for w in windows)
    stream = np.concatenate([np.asarray(s) for s in ds.shards["train"] + ds.shards["val"]])
    assert len(stream) == ds.train_tokens + ds.val_tokens
    assert ds.val_tokens == math.ceil(len(stream) * 0.05)
    docs = ds.decode(stream.tolist()).split(data.EOT)
    assert len(docs) == 4 and docs[-1] == ""  # three files, each followed by EOT
    assert docs[0].startswith("def f0_0(x):")


def test_long_documents_are_encoded_in_pieces_without_losing_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "_PIECE_CHARS", 500)  # forces every document into many pieces
    monkeypatch.setattr(shards, "_BATCH_CHARS", 1_200)
    corpus = _write_corpus(tmp_path / "corpus", n_files=2, lines=120)
    ds = build(_cfg(tmp_path, corpus, max_chars=6_000), 300)
    stream = np.concatenate([np.asarray(s) for s in ds.shards["train"] + ds.shards["val"]])
    assert int((stream == ds.eot_id).sum()) == 2  # one EOT per document, not per piece
    originals = [(corpus / f"doc{i}.txt").read_text() for i in range(2)]
    expected = originals[0] + data.EOT + originals[1][: 6_000 - len(originals[0])] + data.EOT
    assert ds.meta["sources"]["chars"] == 6_000 and ds.decode(stream.tolist()) == expected


def test_batch_is_fast(ds: data.Dataset) -> None:
    ds.batch("train", 0, 0, 8, 256, 0)
    t0 = time.perf_counter()
    for step in range(200):
        ds.batch("train", step, 0, 8, 256, 0)
    assert (time.perf_counter() - t0) / 200 < 0.01


# --- cache -----------------------------------------------------------------------------------------


def test_second_build_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, _write_corpus(tmp_path / "corpus"))
    first = build(cfg, 300)
    mtime = (first.cache_path / "shard-00000.bin").stat().st_mtime_ns

    def no_training(*_):
        raise AssertionError("the tokenizer was retrained although the cache is complete")

    monkeypatch.setattr(tokenizer.Bpe, "train", no_training)
    second = build(cfg, 300)
    assert (second.cache_key, second.cache_path) == (first.cache_key, first.cache_path)
    assert (second.cache_path / "shard-00000.bin").stat().st_mtime_ns == mtime
    assert second.cache_path.name == first.cache_key[:16]


def test_cache_key_follows_text_and_vocab(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "corpus")
    base = build(_cfg(tmp_path, corpus), 300).cache_key
    assert build(_cfg(tmp_path, corpus), 310).cache_key != base
    assert build(_cfg(tmp_path, corpus, val_fraction=0.1), 300).cache_key != base
    (corpus / "doc1.txt").write_text((corpus / "doc1.txt").read_text() + "one more line\n")
    edited = build(_cfg(tmp_path, corpus), 300).cache_key
    assert edited != base
    # Moving the corpus keeps the key: it hashes relative names and content, not where they live.
    moved = corpus.rename(tmp_path / "elsewhere")
    assert build(_cfg(tmp_path, moved), 300).cache_key == edited


def test_cache_without_meta_json_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, _write_corpus(tmp_path / "corpus"))
    first = build(cfg, 300)
    meta = json.loads((first.cache_path / "meta.json").read_text())
    assert meta["train_tokens"] == first.train_tokens and meta["key"] == first.cache_key
    (first.cache_path / "meta.json").unlink()
    (first.cache_path / "shard-00000.bin").write_bytes(b"\0")  # what a crash might leave behind
    calls = _count_training(monkeypatch)
    again = build(cfg, 300)
    assert calls == [300]
    assert (again.cache_path / "meta.json").exists()
    assert again.train_tokens == first.train_tokens and len(again.shards["train"][0]) == first.train_tokens


def test_crash_mid_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, _write_corpus(tmp_path / "corpus"))

    def crash(*_):
        raise RuntimeError("simulated crash while encoding")

    real = shards._ids
    monkeypatch.setattr(shards, "_ids", crash)
    with pytest.raises(RuntimeError):
        build(cfg, 300)
    cache_dir = tmp_path / "cache"
    # The shard store may keep finished shards for the next build; no cache and no shard is half there.
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == ["shards"]
    assert list((cache_dir / "shards").iterdir()) == []
    monkeypatch.setattr(shards, "_ids", real)
    assert build(cfg, 300).train_tokens > 0


@pytest.mark.parametrize("locked", [True, False], ids=["with-lock", "lock-free-rename-race"])
def test_concurrent_builders_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locked: bool) -> None:
    if not locked:  # e.g. a shared filesystem where flock does nothing: the atomic rename must still hold
        monkeypatch.setattr(cache, "_lock", lambda _path: contextlib.nullcontext())
    cfg = _cfg(tmp_path, _write_corpus(tmp_path / "corpus"))
    results: list = [None] * 4
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        start.wait()
        try:
            results[i] = build(cfg, 300)
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, data.Dataset) for r in results), results
    assert len({r.cache_path for r in results}) == 1
    entries = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert sorted(entries) == sorted([results[0].cache_path.name, "shards"])
    batches = [r.batch("train", 3, 0, 2, 16, 0)[0] for r in results]
    assert all(torch.equal(b, batches[0]) for b in batches)


@pytest.mark.parametrize(("vocab", "dtype", "itemsize"), [(320, "uint16", 2), (70_000, "uint32", 4)])
def test_token_dtype_follows_vocab_size(tmp_path: Path, vocab: int, dtype: str, itemsize: int) -> None:
    ds = build(_cfg(tmp_path, _write_corpus(tmp_path / "corpus", n_files=1, lines=100)), vocab)
    assert ds.meta["dtype"] == dtype
    size = (ds.cache_path / "shard-00000.bin").stat().st_size
    assert size == (ds.train_tokens + ds.val_tokens) * itemsize
    assert ds.vocab_size <= vocab  # a small corpus runs out of merges before a large target


# --- errors ----------------------------------------------------------------------------------------


def test_bad_paths_are_all_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    cfg = _cfg(tmp_path, tmp_path, paths=["missing.txt", "nothing/*.md", "adir"])
    with pytest.raises(DataError) as err:
        build(cfg, 300)
    msg = str(err.value)
    assert "data.paths[0]: 'missing.txt' does not exist" in msg and str(tmp_path / "missing.txt") in msg
    assert "data.paths[1]: 'nothing/*.md' matched no files" in msg
    assert "data.paths[2]: 'adir' is a directory" in msg and "adir/**/*.txt" in msg
    assert "data=stdlib" in msg


def test_all_empty_files_is_an_error(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"all 2 matched files are empty"):
        build(_cfg(tmp_path, tmp_path), 300)


def test_config_problems_are_collected(tmp_path: Path) -> None:
    bad = DataConfig(source="txt", max_chars=-1, val_fraction=1.5, shard_tokens=1)
    problems = data.validate(bad)
    assert len(problems) == 4 and "did you mean text?" in problems[0]
    assert data.validate(DataConfig()) == []
    assert "data.paths: empty" in data.validate(DataConfig(source="text"))[0]
    with pytest.raises(DataError, match="vocab_size"):
        build(DataConfig(cache_dir=str(tmp_path)), 100)


def test_too_small_corpus_names_the_knobs(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("print('hello world')\n" * 20)
    cfg = _cfg(tmp_path, tmp_path, paths=[str(tmp_path / "tiny.txt")])
    ds = build(cfg, 300)  # fine on its own ...
    with pytest.raises(DataError, match=r"corpus too small: the val split .*data\.val_fraction"):
        build(cfg, 300, seq_len=64)  # ... but not for this context length
    with pytest.raises(DataError, match=r"corpus too small: the train split .*data\.max_chars"):
        ds.batch("train", 0, 0, 1, 10_000, 0)


def test_globs_expand_home_recurse_and_deduplicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_corpus(tmp_path / "notes" / "deep" / "er", n_files=2, lines=50)
    (tmp_path / "notes" / "top.txt").write_text("top level text\n" * 50)
    (tmp_path / "notes" / "empty.txt").write_text("")  # skipped: others have text
    paths = ["~/notes/**/*.txt", str(tmp_path / "notes" / "top.txt")]
    ds = build(_cfg(tmp_path, tmp_path, paths=paths, val_fraction=0.2), 300)
    summary = ds.meta["sources"]
    assert summary["documents"] == 3  # top.txt matched twice, counted once
    assert (summary["first"], summary["last"]) == ("deep/er/doc0.txt", "top.txt")


# --- the bundled corpus ----------------------------------------------------------------------------


def test_stdlib_corpus_round_trips_python_source(tmp_path: Path) -> None:
    ds = build(DataConfig(cache_dir=str(tmp_path), max_chars=300_000), 512, seq_len=128)
    summary = ds.meta["sources"]
    assert summary["source"] == "stdlib" and summary["chars"] == 300_000
    # Documents come in sha256(path) order: a sample of the whole library, not its alphabetical start.
    first = min(data.documents(DataConfig()), key=lambda d: hashlib.sha256(d.rel.encode()).hexdigest())
    assert summary["first"] == first.rel
    assert ds.vocab_size == 512 and ds.eot_id == ds.encode(data.EOT)[0] == 0
    text = inspect.getsource(cache) + "# ünïcödé ✓ and a tab\t\r\n"
    ids = ds.encode(text)
    assert len(ids) < 0.7 * len(text.encode())  # merges learned from Python source
    assert ds.decode(ids) == text
    x, _ = ds.batch("val", 0, 0, 4, 128, 0)
    assert x.max().item() < ds.vocab_size


STDLIB = Path(sysconfig.get_paths()["stdlib"])
# What generator tools write at the top of the files they produce (token.py, keyword.py, pydoc_data/topics.py).
MARKER = re.compile(r"auto-?generated|automatically generated|do not edit", re.I)


def test_stdlib_corpus_leaves_out_codecs_and_generated_files() -> None:
    docs = data.documents(DataConfig())
    rels = {d.rel for d in docs}
    assert rels and all(d.path == STDLIB / d.rel for d in docs)
    assert not [r for r in rels if r.startswith("encodings/")], "codec tables are not hand-written Python"
    marked = {
        p.relative_to(STDLIB).as_posix()
        for p in STDLIB.glob("**/*.py")
        if MARKER.search("\n".join(p.read_text("utf-8", errors="replace").splitlines()[:10]))
    }
    assert {"token.py", "keyword.py"} <= marked  # the marker test itself finds what it should
    assert not rels & marked, sorted(rels & marked)
    assert {"os.py", "json/decoder.py", "collections/__init__.py"} <= rels  # ordinary modules stay
    hashes = [hashlib.sha256(d.rel.encode()).hexdigest() for d in docs]
    assert hashes == sorted(hashes)


@pytest.mark.parametrize(
    ("text", "generated"),
    [
        ("# Auto-generated by Tools/scripts/generate_token.py\nENDMARKER = 0\n", True),
        ('"""Keywords\n\nThis file is automatically generated; please leave it alone!\n"""\n', True),
        ("# system configuration generated and used by the sysconfig module\nbuild_time_vars = {}\n", True),
        ("table = {\n" + "".join(f"    'name{i}': 0x{i:04x},  # {i}\n" for i in range(200)) + "}\n", True),
        ("data = [" + ", ".join(str(i) for i in range(2000)) + "]\n", True),
        ('"""An AST can be generated by passing ast.PyCF_ONLY_AST to compile()."""\n\nimport sys\n', False),
        ("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200)), False),
        (
            "MAP = {\n"
            + "".join(f"    'k{i}': 'v{i}',\n" for i in range(20))
            + "}\n\ndef get(k):\n    return MAP[k]\n",
            False,
        ),
    ],
    ids=[
        "marker",
        "docstring-marker",
        "comment-marker",
        "table",
        "long-line",
        "docstring-prose",
        "code",
        "short-map",
    ],
)
def test_is_generated(text: str, generated: bool) -> None:
    assert sources.is_generated(text) is generated
