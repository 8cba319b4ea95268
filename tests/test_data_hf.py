"""data=hf through `datasets` (a local dataset directory, local files, streaming, offline) and data=text
reading jsonl and parquet rows. Every dataset is built here, on disk; nothing comes from the Hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from greenrun import data
from greenrun.data import DataConfig, DataError, build

ROWS = [f"story {i}: once upon a time there was a token number {i}.\nThe end." for i in range(60)]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' own cache (what load_dataset materialises) under the test's directory, bars off."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()


def _stream_docs(ds: data.Dataset) -> list[str]:
    stream = np.concatenate([np.asarray(s) for s in ds.shards["train"] + ds.shards["val"]])
    return ds.decode(stream.tolist()).split(data.EOT)[:-1]


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), max_chars=0, tokenizer="bytes", workers=1, **kw)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    import datasets

    path = tmp_path / "saved"
    rows = {"text": ROWS, "id": list(range(len(ROWS)))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


def test_a_local_dataset_directory(tmp_path: Path, saved: Path) -> None:
    ds = build(_cfg(tmp_path, source="hf", name=str(saved)), 300)
    assert _stream_docs(ds) == ROWS
    summary = ds.meta["sources"]
    assert (summary["source"], summary["documents"], summary["first"]) == ("hf", 60, "train[0]")
    assert ds.meta["config"]["val_fraction"] == 0.05 and ds.val_tokens > 0


def test_streaming_a_local_dataset_gives_the_same_tokens_and_cache(tmp_path: Path, saved: Path) -> None:
    whole = build(_cfg(tmp_path, source="hf", name=str(saved)), 300)
    streamed = build(_cfg(tmp_path, source="hf", name=str(saved), streaming=True), 300)
    assert streamed.cache_path == whole.cache_path  # a local dataset is hashed, streamed or not


def test_a_dataset_dict_picks_data_split(tmp_path: Path) -> None:
    import datasets

    splits = {"train": ROWS[:40], "validation": ROWS[40:]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in splits.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = _cfg(tmp_path, source="hf", name=str(tmp_path / "dd"), split="validation", text_field="body")
    assert _stream_docs(build(cfg, 300)) == ROWS[40:]
    with pytest.raises(DataError, match=r"data\.split='test': .* has the splits train, validation"):
        build(_cfg(tmp_path, source="hf", name=str(tmp_path / "dd"), split="test", text_field="body"), 300)


def test_a_missing_text_field_names_the_columns(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(
        DataError, match=r"data\.text_field='content': .* has no such column; it has text, id"
    ):
        build(_cfg(tmp_path, source="hf", name=str(saved), text_field="content"), 300)


@pytest.mark.parametrize("streaming", [False, True], ids=["materialised", "streamed"])
def test_local_json_files_through_datasets(tmp_path: Path, streaming: bool) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ROWS))
    cfg = _cfg(tmp_path, source="hf", name="json", paths=[str(path)], streaming=streaming)
    assert _stream_docs(build(cfg, 300)) == ROWS


def test_hf_problems_are_collected() -> None:
    assert data.validate(DataConfig(source="hf"))[0].startswith("data.name: empty but data.source=hf")
    assert "data.paths" in data.validate(DataConfig(source="hf", name="parquet"))[0]
    assert "only data.source=hf streams" in data.validate(DataConfig(streaming=True))[0]


def test_offline_mode_refuses_a_dataset_missing_from_the_cache(tmp_path: Path) -> None:
    """A fresh process, as a user's would be: HF_DATASETS_OFFLINE is read when datasets is imported."""
    code = (
        "import sys\n"
        "from greenrun.data import DataConfig, DataError, build\n"
        f"cfg = DataConfig(source='hf', name='greenrun-test/no-such-dataset', cache_dir={str(tmp_path)!r})\n"
        "try:\n    build(cfg, 300)\nexcept DataError as e:\n    print(e); sys.exit(2)\n"
    )
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "data.name='greenrun-test/no-such-dataset': cannot load it" in done.stdout
    assert "HF_DATASETS_OFFLINE" in done.stdout and "local dataset directory" in done.stdout


# --- data=text: jsonl and parquet rows ------------------------------------------------------------------


def test_text_reads_jsonl_and_parquet_rows_by_extension(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t, "n": 1}) + "\n" for t in ROWS[:30]) + "\n")
    pq.write_table(pa.table({"text": ROWS[30:], "n": list(range(30))}), corpus / "b.parquet")
    (corpus / "c.txt").write_text("a plain text file is one document")
    ds = build(_cfg(tmp_path, source="text", paths=[str(corpus / "*")]), 300)
    assert _stream_docs(ds) == ROWS + ["a plain text file is one document"]
    assert (ds.meta["sources"]["first"], ds.meta["sources"]["last"]) == ("a.jsonl:1", "c.txt")


def test_data_format_overrides_the_extension(tmp_path: Path) -> None:
    (tmp_path / "rows.txt").write_text("".join(json.dumps({"body": t}) + "\n" for t in ROWS[:5]))
    cfg = _cfg(tmp_path, source="text", paths=[str(tmp_path / "rows.txt")], format="jsonl", text_field="body")
    assert _stream_docs(build(cfg, 300)) == ROWS[:5]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"body": "x"}', r"rows\.jsonl: line 2 has no field 'text' \(it has: body\); set data\.text_field"),
        ("not json", r"rows\.jsonl: line 2 is not JSON"),
        ('{"text": 3}', r"line 2: field 'text' holds int, not text"),
    ],
    ids=["missing-field", "not-json", "not-a-string"],
)
def test_bad_jsonl_rows_say_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"data\.paths\[0\]: .*" + message):
        build(_cfg(tmp_path, source="text", paths=[str(tmp_path / "rows.jsonl")]), 300)


def test_a_parquet_file_without_the_column_names_its_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ROWS}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: no column 'text' \(it has: body\)"):
        build(_cfg(tmp_path, source="text", paths=[str(tmp_path / "b.parquet")]), 300)


def test_the_hf_option_deduplicates_by_default_and_text_does_not() -> None:
    from greenrun.core import shipped

    assert shipped.load_option("data", "hf")["dedup"] == "exact"
    assert DataConfig().dedup == "none" and "dedup" not in shipped.load_option("data", "text")


def test_only_a_streamed_hub_dataset_is_keyed_by_its_name(tmp_path: Path, saved: Path) -> None:
    from greenrun.data.hf import HuggingFace

    hub = DataConfig(source="hf", name="someone/corpus", streaming=True, text_field="body")
    assert json.loads(HuggingFace().identity(hub)) == ["someone/corpus", "", "train", "body"]
    for local in (
        DataConfig(source="hf", name="someone/corpus"),  # materialised: hashed like any corpus
        DataConfig(source="hf", name=str(saved), streaming=True),  # a local directory costs no download
        DataConfig(source="hf", name="json", paths=["x.jsonl"], streaming=True),
    ):
        assert HuggingFace().identity(local) is None
