"""Training data: corpus -> dedup -> tokenizer -> cached token shards -> random batches.

The default corpus is the Python standard library of the running interpreter: real text that nobody here
wrote, present on every machine, so a first run needs no downloads. `source=text` reads the user's own files
(plain text, jsonl, parquet), `source=hf` a Hugging Face dataset. docs/data.md says how to bring data.

  sources.py    the `data.*` config and the SOURCES registry: which records, in which order
  formats.py    jsonl and parquet files: one record per row
  hf.py         source=hf through `datasets` (a local directory, local files, the Hub; streaming)
  tokenizer.py  the TOKENIZERS registry: bpe (trained here), gpt2, bytes, path; all end as tokenizer.json
  dedup.py      exact and MinHash/LSH near-duplicate removal, with its report
  shards.py     records -> groups -> token shard files, tokenised once in parallel worker processes
  index.py      meta.json: the shard files, the train/val segments cut from them, checks of a copy
  s3cache.py    data.cache_url: the built cache shared through a bucket
  cache.py      the cache key, building and publishing a cache (build); window scores
  dataset.py    a built cache read back: encode/decode and batches as a pure function
"""

from greenrun.data import hf  # noqa: F401 - registers data.source=hf
from greenrun.data.cache import FORMAT_VERSION, build, validate
from greenrun.data.dataset import Dataset
from greenrun.data.sources import (
    SOURCES,
    DataConfig,
    DataError,
    Doc,
    Source,
    documents,
    records,
    sample_prompt,
)
from greenrun.data.tokenizer import EOT, TOKENIZERS

__all__ = [
    "EOT",
    "FORMAT_VERSION",
    "SOURCES",
    "TOKENIZERS",
    "DataConfig",
    "DataError",
    "Dataset",
    "Doc",
    "Source",
    "build",
    "documents",
    "records",
    "sample_prompt",
    "validate",
]
