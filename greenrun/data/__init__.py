"""Training data: corpus -> byte-level BPE tokenizer -> cached token shards -> random batches.

The default corpus is the Python standard library of the running interpreter: real text that
nobody here wrote, present on every machine, so a first run needs no downloads. `source=text`
reads the user's own files instead.

  sources.py  the `data.*` config and the SOURCES registry: which documents, in which order
  cache.py    tokenizer training, token shards, building and publishing the cache (build)
  dataset.py  a built cache read back: encode/decode and batches as a pure function
"""

from greenrun.data.cache import EOT, FORMAT_VERSION, build
from greenrun.data.dataset import Dataset
from greenrun.data.sources import (
    SOURCES,
    DataConfig,
    DataError,
    Doc,
    Source,
    documents,
    sample_prompt,
    validate,
)

__all__ = [
    "EOT",
    "FORMAT_VERSION",
    "SOURCES",
    "DataConfig",
    "DataError",
    "Dataset",
    "Doc",
    "Source",
    "build",
    "documents",
    "sample_prompt",
    "validate",
]
