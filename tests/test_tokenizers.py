"""data.tokenizer: every option ends as tokenizer.json in the cache, with the Dataset contract on top.

The gpt2 option loads a GPT-2-style tokenizer directory that the test builds itself (a tiny byte-level BPE
saved through transformers): nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from greenrun import data
from greenrun.data import DataConfig, DataError, build, shards, tokenizer

TEXT = "def f(x):\n    return x * 2  # ünïcödé ✓\t\r\n" * 3


def _corpus(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(
            "".join(f"line {i} {j}: ünïcödé ✓ def f(x): pass\n" for j in range(200))
        )
    return root


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    kw = {"paths": [str(_corpus(tmp_path / "corpus") / "*.txt")], "max_chars": 0} | kw
    return DataConfig(source="text", cache_dir=str(tmp_path / "cache"), workers=1, **kw)


def _tiny_bpe(vocab: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT, "hello world, line of text"] * 20, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style tokenizer directory, as transformers writes one (never a download)."""
    from transformers import GPT2TokenizerFast

    eot = "<|endoftext|>"
    wrapped = GPT2TokenizerFast(tokenizer_object=_tiny_bpe(), bos_token=eot, eos_token=eot, unk_token=eot)
    path = tmp_path_factory.mktemp("gpt2-tokenizer")
    wrapped.save_pretrained(str(path))
    return path


def _stream(ds: data.Dataset) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in ds.shards["train"] + ds.shards["val"]])


def _check_contract(ds: data.Dataset, reference: Tokenizer) -> None:
    saved = ds.cache_path / "tokenizer.json"
    assert isinstance(ds.tokenizer, Tokenizer) and saved.is_file()
    assert Tokenizer.from_file(str(saved)).to_str() == ds.tokenizer.to_str()
    assert ds.encode(TEXT) == reference.encode(TEXT, add_special_tokens=False).ids
    assert ds.decode(ds.encode(TEXT)) == TEXT
    assert ds.tokenizer.id_to_token(ds.eot_id) == data.EOT
    stream = _stream(ds)
    assert int(stream.max()) < ds.vocab_size and int((stream == ds.eot_id).sum()) == 3  # one EOT per file
    first = (ds.cache_path.parent.parent / "corpus" / "doc0.txt").read_text()
    assert ds.decode(stream.tolist()).split(data.EOT)[0] == first


def test_bytes_are_their_own_ids(tmp_path: Path) -> None:
    ds = build(_cfg(tmp_path, tokenizer="bytes"), 300)
    assert ds.vocab_size == 257 and ds.eot_id == 256 and ds.meta["dtype"] == "uint16"
    assert ds.encode(TEXT) == list(TEXT.encode())
    _check_contract(ds, tokenizer.Bytes().load(DataConfig()))
    assert sorted(tokenizer.byte_chars()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_the_bytes_fast_path_gives_the_tokenizers_ids() -> None:
    tok = tokenizer.Bytes().load(DataConfig())
    shards.init_encoder(tok.to_str(), data.EOT, True, "<u2")
    fast = np.concatenate(list(shards._ids([TEXT, "a<|endoftext|>b", "\x00\x7f€𝄞"])))
    shards.init_encoder(tok.to_str(), data.EOT, False, "<u2")
    slow = np.concatenate(list(shards._ids([TEXT, "a<|endoftext|>b", "\x00\x7f€𝄞"])))
    assert fast.tolist() == slow.tolist()
    assert fast.tolist().count(256) == 4  # three ends of document and the EOT written inside the text


def test_gpt2_loads_a_local_tokenizer_directory(tmp_path: Path, gpt2_dir: Path) -> None:
    ds = build(_cfg(tmp_path, tokenizer="gpt2", tokenizer_path=str(gpt2_dir)), 320)
    _check_contract(ds, Tokenizer.from_file(str(gpt2_dir / "tokenizer.json")))
    assert ds.meta["tokenizer"]["kind"] == "gpt2" and ds.vocab_size == 300


def test_path_loads_any_tokenizer_json(tmp_path: Path) -> None:
    tok = _tiny_bpe(280)
    tok.enable_truncation(8)  # a model's max length must never cut a document
    tok.save(str(tmp_path / "tok.json"))
    ds = build(_cfg(tmp_path, tokenizer="path", tokenizer_path=str(tmp_path / "tok.json")), 300)
    tok.no_truncation()
    _check_contract(ds, tok)
    assert ds.tokenizer.truncation is None


def test_bpe_stays_the_default_and_trains_on_the_corpus(tmp_path: Path) -> None:
    assert DataConfig().tokenizer == "bpe"
    ds = build(_cfg(tmp_path), 300)
    assert ds.meta["tokenizer"]["kind"] == "bpe" and ds.vocab_size <= 300 and ds.eot_id == 0
    assert ds.decode(ds.encode(TEXT)) == TEXT


def test_the_cache_key_follows_the_tokenizer_not_the_model_width(tmp_path: Path) -> None:
    by_bytes = build(_cfg(tmp_path, tokenizer="bytes"), 300)
    assert build(_cfg(tmp_path, tokenizer="bytes"), 512).cache_key == by_bytes.cache_key
    assert build(_cfg(tmp_path), 300).cache_key != by_bytes.cache_key
    _tiny_bpe().save(str(tmp_path / "a.json"))
    _tiny_bpe(290).save(str(tmp_path / "b.json"))
    a = build(_cfg(tmp_path, tokenizer="path", tokenizer_path=str(tmp_path / "a.json")), 300).cache_key
    b = build(_cfg(tmp_path, tokenizer="path", tokenizer_path=str(tmp_path / "b.json")), 300).cache_key
    assert a != b


def test_a_model_narrower_than_the_tokenizer_is_refused_naming_the_key(
    tmp_path: Path, gpt2_dir: Path
) -> None:
    with pytest.raises(DataError, match=r"model\.vocab_size=299 .* 300 ids of data\.tokenizer=gpt2.*=300"):
        build(_cfg(tmp_path, tokenizer="gpt2", tokenizer_path=str(gpt2_dir)), 299)
    assert not (tmp_path / "cache").exists()  # refused before anything was read or written


def test_tokenizer_problems_are_reported_together(tmp_path: Path) -> None:
    problems = data.validate(DataConfig(tokenizer="gtp2", eot_token=""))
    assert "data.tokenizer: unknown value 'gtp2' (did you mean gpt2?)" in problems[0]
    assert any(p.startswith("data.eot_token") for p in problems)
    assert "data.tokenizer_path" in data.validate(DataConfig(tokenizer="path"))[0]
    # A resume whose cache is here needs neither the corpus nor the tokenizer's location.
    assert data.validate(DataConfig(tokenizer="path"), need_corpus=False) == []


@pytest.mark.parametrize("what", ["missing", "not json"])
def test_a_bad_tokenizer_file_is_one_clear_error(tmp_path: Path, what: str) -> None:
    path = tmp_path / "tok.json"
    if what == "not json":
        path.write_text("{ nope")
    with pytest.raises(DataError, match=r"data\.tokenizer_path=.*cannot load"):
        build(_cfg(tmp_path, tokenizer="path", tokenizer_path=str(path)), 300)


def test_an_eot_token_missing_from_the_vocabulary_names_the_key(tmp_path: Path) -> None:
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match=r"data\.eot_token='<\|endoftext\|>' is not in .*</s>"):
        build(_cfg(tmp_path, tokenizer="path", tokenizer_path=str(tmp_path / "tok.json")), 300)
    ds = build(
        _cfg(tmp_path, tokenizer="path", tokenizer_path=str(tmp_path / "tok.json"), eot_token="</s>"), 300
    )
    assert ds.tokenizer.id_to_token(ds.eot_id) == "</s>"


def test_gpt2_offline_without_the_tokenizer_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(tmp_path, tokenizer="gpt2", tokenizer_path="greenrun-test/no-such-tokenizer")
    with pytest.raises(DataError, match=r"data\.tokenizer=gpt2: cannot load .*HF_HUB_OFFLINE"):
        build(cfg, 50304)


def test_the_index_records_the_tokenizer(tmp_path: Path) -> None:
    ds = build(_cfg(tmp_path, tokenizer="bytes"), 300)
    meta = json.loads((ds.cache_path / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == tokenizer.digest(ds.tokenizer)
    assert meta["requested_vocab_size"] == 300 and meta["vocab_size"] == 257
