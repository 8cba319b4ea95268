"""Where a run lives: its local directory (with its one-writer lock) and, with storage=s3, its mirror in a bucket.

A run's key in the bucket is `<storage.prefix>/<run id>`, the run id being the run directory's name. At start the
mirror gets config.yaml and the token cache (so a fresh machine with another Python still trains on the same
tokens); every committed checkpoint follows through the background uploader, and after it (and once more when the
uploader closes, after summary.json) metrics.jsonl and summary.json, next to config.yaml where
`greenrun report s3://…` reads them. `greenrun resume s3://…` reverses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from greenrun import config, data, storage
from greenrun.ckpt.checkpoint import CheckpointError, read_manifest
from greenrun.ckpt.remote import Remote, parse_run_url
from greenrun.ckpt.retention import Retention
from greenrun.ckpt.uploader import Uploader
from greenrun.config import Config
from greenrun.core import fs, lock
from greenrun.core.fs import UnsafePath, atomic_write, refuse_symlink
from greenrun.runtime.budget import UploadHealth
from greenrun.storage import ObjectNotFound

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
    return Uploader(
        remote,
        Retention(cfg.checkpoint.keep_last, cfg.checkpoint.keep_best),
        health=UploadHealth(cfg.storage.max_failed_uploads, cfg.storage.on_failed_uploads),
        run_files=lambda cancel: mirror_run_files(remote, run_dir, cancel),
    )


# What the report reads besides config.yaml (greenrun.report.load: <run key>/<name>), as training writes them.
RUN_FILES = ("metrics.jsonl", "summary.json")


def mirror_run_files(remote: Remote, run_dir: Path, cancel: threading.Event | None = None) -> list[str]:
    """Put the run's RUN_FILES that exist under its key in the bucket; returns the names sent.

    Best-effort, never raises: a file that cannot be read or sent is logged and left for the next call (the next
    checkpoint, or the end of the run). Each file goes up as one snapshot of its bytes; metrics.jsonl is cut after
    its last complete line, since training may be appending one right now.
    """
    sent = []
    for name in RUN_FILES:
        path = Path(run_dir) / name
        key = f"{remote.run_key}/{name}"
        try:
            refuse_symlink(path)  # never send the file a planted link points at
            if not path.is_file():
                continue
            body = path.read_bytes()
            if name == "metrics.jsonl":
                body = body[: body.rfind(b"\n") + 1]
            remote.storage.put_bytes(key, body, cancel=cancel)
        except Exception as e:  # the mirror must never fail training; StorageError names no credentials
            log.warning(f"could not mirror {path} to {remote.storage.url(key)}: {e}")
            continue
        sent.append(name)
    return sent


# --- one writer per run directory --------------------------------------------------------------------

# What greenrun writes in a run directory, checked when the lock is taken so that a planted link is refused
# before any work starts (fs refuses it again at each write).
_WRITTEN = ("config.yaml", "metrics.jsonl", "summary.json", "export")


def locked_here(run_dir: Path) -> bool:
    """Whether this process may write run_dir now: it holds the lock, or it is not rank 0 (only rank 0 writes)."""
    return int(os.environ.get("RANK", "0")) != 0 or lock.held(run_dir)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """`with hold(run_dir):` this process is run_dir's one writer (re-entrant; on rank 0 only).

    A second writer is refused with the holder's pid and host, and a symlink where greenrun writes is refused
    (here, before any work, and at each write): both as a ConfigError, exit 2, since they are usage conflicts.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    existed = Path(run_dir).exists()
    try:
        held = lock.acquire(run_dir)
    except (lock.Busy, UnsafePath) as e:
        raise config.ConfigError([str(e)]) from None
    except OSError as e:  # e.g. a read-only filesystem, where even root cannot create it
        raise config.ConfigError(
            [f"run.dir={run_dir}: cannot create it ({e.strerror}); choose another run.dir"]
        ) from None
    try:
        for name in _WRITTEN:
            refuse_symlink(Path(run_dir) / name)
        yield
    except UnsafePath as e:
        raise config.ConfigError([str(e)]) from None
    finally:
        held.release()
        if not existed:
            _remove_if_only_the_lock(Path(run_dir))


def saved_config_path(run_dir: Path) -> Path:
    """RUN_DIR/config.yaml, or a usage error saying the directory is not one `greenrun train` made."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise config.ConfigError(
            [f"{path}: not a greenrun run directory (no config.yaml); pass the RUN_DIR `greenrun train` made"]
        )
    return path


def run_dir_problems(run_dir: Path) -> list[str]:
    """Why run.dir cannot hold a run, before anything is started or created there."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return [f"run.dir={run_dir} is a file, not a directory; choose another run.dir"]
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [
            f"run.dir={run_dir}: cannot create or write it ({parent} is not writable); choose another run.dir"
        ]
    return []


def _remove_if_only_the_lock(run_dir: Path) -> None:
    """A run that failed before training (preflight, data) leaves no empty directory behind."""
    try:
        if {p.name for p in run_dir.iterdir()} == {lock.LOCK_NAME}:
            (run_dir / lock.LOCK_NAME).unlink()
            run_dir.rmdir()
    except OSError:  # another process got there first: its directory now
        pass


# --- s3:// runs: find one, then (under the lock) bring it here -------------------------------------------


@dataclass
class Found:
    """A run in a bucket, its config read and checked, nothing written here yet."""

    url: str
    remote: Remote
    saved: Config  # plain data from the bucket; local keys from this machine; run.dir = local_dir
    local_dir: Path
    overrides: list[str]  # the command line's overrides still to apply (storage.* are applied)


def find(url: str, overrides: list[str], local_root: Path = Path("runs")) -> Found:
    """Read the config.yaml of `s3://bucket/prefix/run` as plain data; writes nothing.

    Keys that name local paths, URLs or commands (config.LOCAL_KEYS) never come from the bucket: anyone who can
    write there could otherwise point them at this machine's files or at their own server. They come from
    today's defaults and the command line, as does the whole storage group. `run.dir=` on the command line
    picks the local directory; its name must be the run's id, under which the mirror uploads.
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
    remote = Remote(storage.build(probe.storage, local_root), run_id)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        try:
            remote.storage.get(f"{run_id}/config.yaml", cfg_path)
        except storage.StorageUnreachable:
            raise  # the network, not the URL: exit 1 with 'could not connect to ...'
        except storage.StorageError as e:
            raise config.ConfigError([f"{url}: no greenrun run there ({e})"]) from None
        saved = config.load_yaml(cfg_path, name=f"{url.rstrip('/')}/config.yaml")
    local_dir = (local_root / run_id).resolve()
    run_dir_overrides = [o for o in rest if o.startswith("run.dir=")]
    if run_dir_overrides:
        asked = config.apply_overrides(config.Config(), run_dir_overrides).run.dir
        local_dir = Path(asked).expanduser().resolve()
        if local_dir.name != run_id:
            raise config.ConfigError(
                [
                    f"run.dir={asked}: the local directory of {url} must be named {run_id}, the run's key in the bucket"
                ]
            )
    saved = config.local_from(saved, config.Config())
    saved = dataclasses.replace(
        saved,
        run=dataclasses.replace(saved.run, dir=str(local_dir)),
        storage=dataclasses.replace(probe.storage),
    )
    return Found(url, remote, saved, local_dir, rest)


def restore(found: Found) -> Config:
    """Bring a found s3:// run here (hold its directory's lock): config.yaml, newest valid checkpoint, tokens.

    Returns the saved config pointing at the local run directory.
    """
    url, remote, saved, local_dir = found.url, found.remote, found.saved, found.local_dir
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
        cache_dir = config.apply_overrides(saved, found.overrides).data.cache_dir
        try:
            remote.download_data_cache(key16, Path(cache_dir).expanduser())
        except ObjectNotFound as e:
            log.warning(f"{e}: the tokens must then be rebuilt from data.paths on this command line")
    return saved


# --- the checkpoint's tokens -------------------------------------------------------------------------------


def tokens_here(cfg: Config, manifest: dict) -> Path | None:
    """The token cache a checkpoint trained on, if it is under cfg's data.cache_dir."""
    key = manifest.get("data_cache_key", "")
    cache = Path(cfg.data.cache_dir).expanduser() / key[:16] if key else None
    return cache if cache is not None and (cache / "meta.json").is_file() else None


def missing_tokens_hint(cfg: Config, manifest: dict, checkpoint_name: str) -> str:
    key16 = manifest.get("data_cache_key", "")[:16]
    return (
        f"{checkpoint_name} trained on the token cache {key16}, which is neither under "
        f"data.cache_dir={cfg.data.cache_dir} nor (for an s3:// run) in the bucket; and data.paths comes from "
        "this command line and the defaults, never from a saved config: pass data.paths=[...] naming the corpus "
        "the run trained on"
    )


def token_problems(cfg: Config, manifest: dict, checkpoint_name: str) -> list[str]:
    """Without the checkpoint's token cache here, build the tokens from cfg.data and compare the cache keys:
    the same key means the same text and settings, so the run continues on exactly its tokens."""
    key = manifest.get("data_cache_key", "")
    if not key or tokens_here(cfg, manifest) is not None:
        return []
    built = data.build(cfg.data, cfg.model.vocab_size, seq_len=cfg.model.seq_len).cache_key
    if built == key:
        return []
    return [
        f"data: the corpus of data.paths gives the token cache {built[:16]}, but {checkpoint_name} trained on "
        f"{key[:16]} (another text or other data settings); point data.paths at the corpus the run trained on"
    ]


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


def truncate_metrics(path: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps that resume will redo: drop them."""
    fs.refuse_symlink(path)  # neither read another file as metrics nor replace it
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:  # a kill mid-write leaves half a line: it held nothing a resume needs
            torn += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if torn:
        log.warning(f"{path}: dropped {torn} torn line(s) a killed process left half-written")
    atomic_write(path, "".join(line + "\n" for line in kept))
