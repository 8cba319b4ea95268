"""Read a run for the report: its metrics.jsonl, summary.json and config.yaml, from a directory or a bucket.

Everything read here is data. A bucket's files come from whoever can write there, so nothing is executed,
nothing names a path to open, and the HTML escapes every string (greenrun.report.html). Only metrics.jsonl is
required; a run still training (no summary.json yet) or an older one (no energy keys) still gets a report.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

EVENTS = ("resume", "preempt")  # the event records the report draws; others are kept but not drawn


class ReportError(Exception):
    """One message for the user and the exit code: 2 when the command line names no run, 1 when reading fails."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Run:
    name: str  # the legend label: the run directory's name, or the run id in the bucket
    source: str  # where it was read from, as the user named it
    records: list[dict[str, Any]]  # metrics.jsonl step records, in file order
    events: list[dict[str, Any]] = field(
        default_factory=list
    )  # {"event": "resume"|"preempt", "step": N, ...}
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json; {} while the run is training
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml as plain nested dicts; {} if absent


def parse_metrics(text: str, where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, event records) of a metrics.jsonl text; torn or foreign lines are skipped, counted."""
    records, events, skipped = [], [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:  # a kill mid-write leaves half a line
            skipped += 1
            continue
        if not isinstance(obj, dict) or not _is_int(obj.get("step")):
            skipped += 1
        elif "event" in obj:
            events.append(obj)
        else:
            records.append(obj)
    if skipped:
        log.warning(f"{where}: skipped {skipped} line(s) that are not metrics records (torn or foreign)")
    return records, events


def number(value: Any) -> float | None:
    """A finite int or float as float, else None: a bucket's JSON may hold anything, NaN and strings included."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_dict(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        log.warning(f"{where}: not valid JSON; the report leaves its totals out")
        return {}
    return obj if isinstance(obj, dict) else {}


def _yaml_dict(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        obj = yaml.safe_load(text)  # safe_load: plain data, never a Python object a bucket could smuggle in
    except yaml.YAMLError:
        log.warning(f"{where}: not valid YAML; the report leaves the run's settings out")
        return {}
    return obj if isinstance(obj, dict) else {}


def _run(name: str, source: str, metrics: str, summary: str | None, cfg: str | None) -> Run:
    records, events = parse_metrics(metrics, f"{source}/metrics.jsonl")
    return Run(
        name=name,
        source=source,
        records=records,
        events=events,
        summary=_json_dict(summary, f"{source}/summary.json"),
        config=_yaml_dict(cfg, f"{source}/config.yaml"),
    )


def load_dir(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise ReportError(
            f"{path}: {what}; pass the RUN_DIR `greenrun train` wrote (it holds metrics.jsonl)", exit_code=2
        )
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(
            f"{metrics}: no such file, so {path} is not a greenrun run directory (or its run logged no step "
            "yet); pass the RUN_DIR `greenrun train` wrote",
            exit_code=2,
        )

    def text(name: str) -> str | None:
        try:
            return (path / name).read_text(errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ReportError(f"{path / name}: cannot be read ({e}); check its permissions") from None

    return _run(
        path.resolve().name, str(path), text("metrics.jsonl") or "", text("summary.json"), text("config.yaml")
    )


def load_s3(url: str, storage_overrides: list[str]) -> Run:
    """Read `s3://bucket/prefix/run` (its files under the run's key) without writing anything here."""
    # config and runs pull in torch (seconds): only an s3:// report pays for them.
    from greenrun import config, runs, storage

    try:
        remote = runs.remote_for_url(url, storage_overrides)
    except config.ConfigError as e:
        raise ReportError(f"{e}; expected s3://bucket/prefix/run", exit_code=2) from None

    def text(name: str, required: bool = False) -> str | None:
        key = f"{remote.run_key}/{name}"
        try:
            return remote.storage.get_bytes(key).decode("utf-8", errors="replace")
        except storage.ObjectNotFound:
            if not required:
                return None
            raise ReportError(
                f"{url}/{name}: not in the bucket, so the report has nothing to draw; check the URL "
                "(s3://bucket/prefix/run, the run id being its run directory's name), or report the local "
                "RUN_DIR the run wrote",
                exit_code=2,
            ) from None
        except storage.StorageError as e:  # unreachable, access denied: the message names the endpoint
            raise ReportError(
                f"{url}: cannot read {name} ({e}); check the credentials and storage.endpoint_url / "
                "storage.region on the command line"
            ) from None

    metrics = text("metrics.jsonl", required=True) or ""
    return _run(remote.run_key, url, metrics, text("summary.json"), text("config.yaml"))


def load(target: str, storage_overrides: list[str] | None = None) -> Run:
    """A run directory or an s3:// run URL -> its Run, or a ReportError naming the path and the fix."""
    if target.startswith("s3://"):
        return load_s3(target, list(storage_overrides or []))
    return load_dir(Path(target))
