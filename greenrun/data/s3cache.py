"""data.cache_url: token caches shared through a bucket, so a fresh (spot) machine downloads, not tokenises.

Layout under s3://bucket/prefix: `<key16>/tokenizer.json`, `<key16>/shard-NNNNN.bin` and `<key16>/meta.json`,
the index, uploaded last (If-None-Match: one writer wins) so that its presence marks a complete upload.
A download lands in a temp dir beside the cache, every file checked against the size and sha256 the index
records, and is renamed into place only then; a cache that fails the check is rebuilt here instead.
The bucket is reached through greenrun.storage's S3 backend (credentials from boto3's default chain,
data.cache_endpoint_url for MinIO, R2 or a test server). A bucket that cannot be reached never stops a
run: the cache is built (or kept) here and a warning says why the bucket was not used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from greenrun.core import checks
from greenrun.data import index
from greenrun.data.sources import DataConfig

if TYPE_CHECKING:
    from greenrun.data.dataset import Dataset
    from greenrun.storage import Storage

log = logging.getLogger(__name__)

_MAX_META = 64 << 20  # an index this large is not one of ours
_ATTEMPTS = 3  # tries per S3 request


def problems(cfg: DataConfig) -> list[str]:
    found = []
    if cfg.cache_url:
        from greenrun.storage import check_prefix, parse_s3_url

        try:
            _, prefix = parse_s3_url(cfg.cache_url)
            check_prefix(prefix)
        except ValueError as e:
            found.append(f"data.cache_url: {e}")
    found += checks.http_url(
        "data.cache_endpoint_url", cfg.cache_endpoint_url, "http://127.0.0.1:9000 (None = AWS)"
    )
    return found


def _storage(cfg: DataConfig) -> Storage:
    from greenrun.storage import S3Storage, StorageConfig, parse_s3_url

    bucket, prefix = parse_s3_url(cfg.cache_url)
    # Few tries: the bucket only saves work here, and a build that can go on must not wait minutes for it.
    where = StorageConfig(kind="s3", bucket=bucket, prefix=prefix, endpoint_url=cfg.cache_endpoint_url)
    return S3Storage(dataclasses.replace(where, max_attempts=_ATTEMPTS))


def fetch(cfg: DataConfig, key: str, final: Path) -> bool:
    """Download the cache `key` into `final` if the bucket has a complete one; False if it has none."""
    from greenrun.storage import ObjectNotFound, StorageError

    try:
        storage = _storage(cfg)
        prefix = f"{key[:16]}/"
        if not storage.exists(prefix + "meta.json"):
            return False
        blob = storage.get_bytes(prefix + "meta.json")
        meta = json.loads(blob) if len(blob) <= _MAX_META else None
        if not isinstance(meta, dict) or meta.get("key") != key:
            log.warning(f"data.cache_url: {storage.url(prefix + 'meta.json')} is not the index of {key[:16]}")
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".download-{key[:16]}-", dir=final.parent))
        try:
            for name in ["tokenizer.json", *index.files(meta)]:
                storage.get(prefix + name, tmp / name)
            problem = index.problem(tmp, meta, check_sha256=True)
            if problem:
                log.warning(
                    f"data.cache_url: the cache at {storage.url(prefix + 'meta.json')} is damaged ({problem}); building"
                )
                return False
            with open(tmp / "meta.json", "wb") as fh:  # last: its presence marks the cache complete
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)  # a leftover without a valid meta.json
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (StorageError, ObjectNotFound, OSError, ValueError, KeyError, TypeError) as e:
        log.warning(f"data.cache_url={cfg.cache_url}: not used ({e}); building the token cache here")
        return False
    log.info(f"data: token cache {key[:16]} downloaded from {cfg.cache_url}")
    return True


def push(cfg: DataConfig, dataset: Dataset) -> bool:
    """Upload a complete cache unless the bucket has it; True when this call uploaded it."""
    from greenrun.storage import CommitConflict, StorageError

    prefix = f"{dataset.cache_path.name}/"
    try:
        storage = _storage(cfg)
        if storage.exists(prefix + "meta.json"):
            return False
        for name in ["tokenizer.json", *index.files(dataset.meta)]:
            storage.put(prefix + name, dataset.cache_path / name)
        try:
            storage.put(prefix + "meta.json", dataset.cache_path / "meta.json", if_none_match=True)
        except CommitConflict:
            return False  # another machine uploaded the same cache first
    except (StorageError, OSError, ValueError) as e:
        log.warning(f"data.cache_url={cfg.cache_url}: the token cache was not uploaded ({e})")
        return False
    log.info(f"data: token cache {dataset.cache_path.name} uploaded to {cfg.cache_url}")
    return True
