"""data.source=hf: a corpus read through Hugging Face `datasets`.

data.name says where it is:
  a local directory written by `Dataset.save_to_disk` (or a DatasetDict's: data.split picks one),
  json | parquet | text | csv: those files, named by data.paths (globs as for data=text),
  anything else: a dataset on the Hub (data.config, data.split), read from the Hugging Face cache and
  downloaded into it unless HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1, which this module honours itself
  (datasets reads them only when it is first imported).
data.streaming=true iterates the dataset instead of materialising it in the cache (for corpora larger than
the disk): nothing of it is stored but its tokens. Since hashing a streamed corpus would mean reading all
of it, its cache key names it instead (data.name, config, split, field, files): a new version under the
same name needs a fresh data.cache_dir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from greenrun.data.sources import SOURCES, DataConfig, DataError, Source, Text

LOADERS = ("json", "parquet", "text", "csv")  # data.name values that read data.paths through `datasets`
_BATCH_ROWS = 1000  # rows per Arrow batch read from a materialised dataset
_TRUE = ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@SOURCES.register("hf")
class HuggingFace(Source):
    """Records of one split of a `datasets` dataset: the data.text_field of each row, in row order."""

    def problems(self, cfg: DataConfig) -> list[str]:
        if not cfg.name:
            return [
                "data.name: empty but data.source=hf — a Hub id (data.name=roneneldan/TinyStories), a "
                "directory from save_to_disk, or json|parquet|text|csv with data.paths"
            ]
        if cfg.name in LOADERS and not cfg.paths:
            return [f"data.name={cfg.name} reads files: set data.paths=[corpus/*.{cfg.name}]"]
        return []

    def identity(self, cfg: DataConfig) -> str | None:
        # Local files and directories are hashed like any corpus: reading them costs no download.
        if not cfg.streaming or cfg.name in LOADERS or os.path.isdir(os.path.expanduser(cfg.name)):
            return None
        return json.dumps([cfg.name, cfg.config, cfg.split, cfg.text_field])

    def records(self, cfg: DataConfig) -> Iterator[tuple[str, str]]:
        dataset = _load(cfg)
        columns = getattr(dataset, "column_names", None)
        if columns is not None and cfg.text_field not in columns:
            raise DataError(
                f"data.text_field={cfg.text_field!r}: {cfg.name} ({cfg.split}) has no such column; it has "
                f"{', '.join(columns)}"
            )
        yield from _rows(dataset, cfg)

    def empty(self, cfg: DataConfig) -> str:
        return f"data.name={cfg.name} ({cfg.split}): no row holds text in data.text_field={cfg.text_field!r}"


def _rows(dataset: Any, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    field, split = cfg.text_field, cfg.split
    if cfg.streaming:
        for row, item in enumerate(
            dataset.select_columns([field]) if hasattr(dataset, "select_columns") else dataset
        ):
            if field not in item:
                raise DataError(
                    f"data.text_field={field!r}: row {row} of {cfg.name} has only {', '.join(item)}"
                )
            if isinstance(item[field], str):
                yield f"{split}[{row}]", item[field]
        return
    row = 0
    for batch in dataset.select_columns([field]).iter(batch_size=_BATCH_ROWS):
        for text in batch[field]:
            if isinstance(text, str):
                yield f"{split}[{row}]", text
            row += 1


def _load(cfg: DataConfig) -> Any:
    import datasets  # a second to import: only when data=hf is used

    where = os.path.expanduser(cfg.name)
    try:
        if cfg.name not in LOADERS and os.path.isdir(where) and _saved(Path(where)):
            loaded = datasets.load_from_disk(where)
            if isinstance(loaded, datasets.DatasetDict):
                if cfg.split not in loaded:
                    raise DataError(
                        f"data.split={cfg.split!r}: {cfg.name} has the splits {', '.join(loaded)}"
                    )
                loaded = loaded[cfg.split]
            return loaded.to_iterable_dataset() if cfg.streaming else loaded
        kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
        if cfg.name in LOADERS:
            kwargs["data_files"] = [str(d.path) for d in Text().documents(cfg)]
        if offline():
            kwargs["download_config"] = datasets.DownloadConfig(local_files_only=True)
        return datasets.load_dataset(cfg.name if cfg.name in LOADERS else where, cfg.config or None, **kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises a dozen types (hub, file, value errors) for this
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "check data.name, data.config and data.split"
        if offline() and not os.path.isdir(where) and cfg.name not in LOADERS:
            hint = (
                "HF_DATASETS_OFFLINE (or HF_HUB_OFFLINE) is set and the dataset is not in the Hugging Face "
                "cache: run once online, or point data.name at a local dataset directory"
            )
        raise DataError(
            f"data.name={cfg.name!r}: cannot load it ({type(e).__name__}: {first}); {hint}"
        ) from None


def _saved(path: Path) -> bool:
    """Whether `path` was written by save_to_disk (a Dataset or a DatasetDict), not a folder of data files."""
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))
