"""Where a run lives: its local directory and, with storage=s3, its mirror in a bucket.

A run's key in the bucket is `<storage.prefix>/<run id>`, the run id being the run directory's name. At start the
mirror gets config.yaml and the token cache (so a fresh machine with another Python still trains on the same
tokens); every committed checkpoint follows through the background uploader. `greenrun resume s3://…` reverses it.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from greenrun import config, storage
from greenrun.ckpt.checkpoint import CheckpointError, read_manifest
from greenrun.ckpt.remote import Remote, parse_run_url
from greenrun.ckpt.retention import Retention
from greenrun.ckpt.uploader import Uploader
from greenrun.config import Config
from greenrun.core.fs import atomic_write

log = logging.getLogger(__name__)


def run_key(cfg: Config) -> str:
    """The run's key below the storage's own prefix (S3Storage prepends storage.prefix to every key)."""
    return Path(cfg.run.dir).resolve().name


def open_remote(cfg: Config, run_dir: Path) -> Remote | None:
    """The run's mirror, or None for storage=local. Cleans this run's abandoned multipart uploads."""
    if cfg.storage.kind != "s3":
        return None
    remote = Remote(storage.build(cfg.storage, run_dir), run_key(cfg))
    aborted = remote.storage.abort_stale_uploads(remote.run_key + "/")
    if aborted:
        log.info(
            f"aborted {aborted} unfinished multipart upload(s) a previous attempt left under {remote.run_key}/"
        )
    return remote


def start_mirror(remote: Remote | None, run_dir: Path, data_cache: Path, cfg: Config) -> Uploader | None:
    if remote is None:
        return None
    remote.put_run_file("config.yaml", run_dir / "config.yaml")
    remote.upload_data_cache(data_cache)
    return Uploader(remote, Retention(cfg.checkpoint.keep_last, cfg.checkpoint.keep_best))


def restore(
    url: str, overrides: list[str], local_root: Path = Path("runs")
) -> tuple[Config, Path, list[str]]:
    """Bring an s3:// run to this machine: its config, token cache and newest valid checkpoint.

    Returns (saved config pointing at the local run directory, that directory, overrides left to apply).
    `storage.*` overrides (e.g. an endpoint URL for this machine) apply before anything is downloaded.
    """
    try:
        bucket, key = parse_run_url(url)
    except ValueError as e:  # a bad URL ('s3://b/p/..') is a usage error (exit 2), not a crash (exit 1)
        raise config.ConfigError([str(e)]) from None
    storage_overrides = [o for o in overrides if o.startswith("storage.")]
    rest = [o for o in overrides if o not in storage_overrides]
    prefix, _, run_id = key.rpartition("/")
    probe = config.apply_overrides(
        config.Config(),
        [f"storage.bucket={bucket}", f"storage.prefix={prefix}", "storage.kind=s3", *storage_overrides],
    )
    st = storage.build(probe.storage, local_root)
    remote = Remote(st, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        try:
            st.get(f"{run_id}/config.yaml", cfg_path)
        except storage.StorageError as e:
            raise config.ConfigError([f"{url}: no greenrun run there ({e})"]) from None
        saved = config.load_yaml(cfg_path)
    local_dir = (local_root / run_id).resolve()
    saved = dataclasses.replace(
        saved,
        run=dataclasses.replace(saved.run, dir=str(local_dir)),
        storage=dataclasses.replace(probe.storage),
    )
    local_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(local_dir / "config.yaml", config.to_yaml(saved))
    steps = remote.steps()
    if not steps:
        raise CheckpointError(f"{url}: no committed checkpoint to resume")
    path = remote.fetch_latest_valid(local_dir / "checkpoints", warn=log.warning)
    if path is None:
        raise CheckpointError(f"{url}: no checkpoint verifies (all {len(steps)} failed their sha256 check)")
    key16 = read_manifest(path).get("data_cache_key", "")[:16]
    if key16:
        # Into the cache_dir the resumed run will read, i.e. after a data.cache_dir override (a fresh
        # machine's path): elsewhere the run would rebuild tokens from this machine's corpus instead.
        cache_dir = config.apply_overrides(saved, rest).data.cache_dir
        remote.download_data_cache(key16, Path(cache_dir).expanduser())
    return saved, local_dir, rest


def remote_for_url(url: str, storage_overrides: list[str]) -> Remote:
    """The Remote of `s3://bucket/prefix/run`, with `storage.*` overrides (endpoint, region) for this machine."""
    try:
        bucket, key = parse_run_url(url)
    except ValueError as e:
        raise config.ConfigError([str(e)]) from None
    prefix, _, run_id = key.rpartition("/")
    probe = config.apply_overrides(
        config.Config(),
        [f"storage.bucket={bucket}", f"storage.prefix={prefix}", "storage.kind=s3", *storage_overrides],
    )
    return Remote(storage.build(probe.storage, Path(".")), run_id)
