"""Files of records: JSON Lines and Parquet, each row a document whose text is one field (data.text_field).

Rows are read in file order and yielded as (row number, text); a row whose field is null or empty yields
nothing worth training on, so it is left out here. Parquet is read a batch of rows at a time, one column
only, so a file far larger than memory is fine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

_PARQUET_ROWS = 8192  # rows per Arrow batch: bounded memory, few calls


class FormatError(ValueError):
    """A file that is not what its format says, or lacks the text field; the message says where."""


def jsonl(path: Path, field: str) -> Iterator[tuple[int, str]]:
    """One record per line; blank lines are skipped."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise FormatError(f"line {number} is not JSON ({e}); is it JSON Lines?") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise FormatError(
                    f"line {number} has no field {field!r} (it has: {keys}); set data.text_field"
                )
            text = row[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise FormatError(f"line {number}: field {field!r} holds {type(text).__name__}, not text")
            yield number, text


def parquet(path: Path, field: str) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq  # datasets' own dependency; loaded only when a parquet file is read

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types for a file that is not parquet
        raise FormatError(f"not a parquet file ({e})") from None
    names = reader.schema_arrow.names
    if field not in names:
        raise FormatError(f"no column {field!r} (it has: {', '.join(names)}); set data.text_field")
    row = 0
    for batch in reader.iter_batches(batch_size=_PARQUET_ROWS, columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise FormatError(f"row {row}: column {field!r} holds {type(text).__name__}, not text")
            yield row, text


READERS: dict[str, Callable[[Path, str], Iterator[tuple[int, str]]]] = {"jsonl": jsonl, "parquet": parquet}
