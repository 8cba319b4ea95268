"""What earlier runs in a runs directory measured and reached, read as plain data: their model (config.yaml),
MFU (metrics.jsonl), tokens and final validation loss (summary.json, else the last evaluation in metrics.jsonl).

greenrun.plan uses the MFU of an earlier run of the same architecture instead of an assumed one, and lists the
losses for comparison. Nothing here resolves an interpolation or reads the environment: a run directory may have
been written by others, so unreadable or odd files are skipped rather than raised.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from greenrun.train import model
from greenrun.train.model import ModelConfig

# The fields that fix a model's shape, hence its speed: an earlier run's MFU counts only when all of them match.
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "seq_len", "vocab_size", "bias")


@dataclass(frozen=True)
class EarlierRun:
    dir: Path
    model: str  # the preset name its config.yaml gives
    arch: tuple[Any, ...] | None  # its ARCH_FIELDS values; None when they do not make a valid shape
    params: int | None  # all parameters; None when its model section is not a valid ModelConfig
    tokens: int | None  # tokens trained
    val_loss: float | None  # final validation loss
    mfu: float | None  # median MFU of its logged windows (the first left out: compilation and warm-up)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, as data; [] when it is missing or unreadable."""
    records = []
    try:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                continue
            if isinstance(record, dict):
                records.append(record)
    except (OSError, UnicodeDecodeError):
        pass
    return records


def _read_run(run_dir: Path) -> EarlierRun | None:
    try:
        # Plain data: safe_load builds no objects and resolves nothing, so `${oc.env:...}` stays a string.
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    section = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        return None
    values = tuple(section.get(f) for f in ARCH_FIELDS)
    # A shape only when every field has its type: a string (an unresolved `${...}`, say) matches no model.
    sized = all(type(v) is int and v > 0 for v in values[:-1]) and type(values[-1]) is bool
    arch = values if sized else None
    shape = ModelConfig(**dict(zip(ARCH_FIELDS, values, strict=True))) if sized else None
    params = model.count_params(shape, non_embedding=False) if shape is not None else None
    records = read_metrics(run_dir / "metrics.jsonl")
    mfus = [m for r in records if (m := _number(r.get("mfu"))) is not None]
    # The first window pays for compilation and warm-up; the median then discounts the windows that an
    # evaluation or a checkpoint slowed down.
    mfus = mfus[1:] or mfus
    val = [r for r in records if _number(r.get("val_loss")) is not None]
    tokens, val_loss = (val[-1].get("tokens"), val[-1]["val_loss"]) if val else (None, None)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if isinstance(summary, dict) and _number(summary.get("val_loss")) is not None:
        tokens, val_loss = summary.get("tokens", tokens), summary["val_loss"]
    return EarlierRun(
        run_dir,
        str(section.get("name", "?")),
        arch,
        params,
        int(tokens) if _number(tokens) is not None else None,
        _number(val_loss),
        statistics.median(mfus) if mfus else None,
    )


def earlier_runs(runs_dir: Path | None) -> list[EarlierRun]:
    """Every run directory under `runs_dir` with a readable config.yaml, newest first (by metrics.jsonl)."""
    if runs_dir is None or not Path(runs_dir).is_dir():
        return []
    dirs = [d for d in Path(runs_dir).iterdir() if (d / "config.yaml").is_file()]

    def newest(d: Path) -> float:
        path = d / "metrics.jsonl" if (d / "metrics.jsonl").is_file() else d / "config.yaml"
        return path.stat().st_mtime

    found = (_read_run(d) for d in sorted(dirs, key=newest, reverse=True))
    return [r for r in found if r is not None]


def measured_mfu(runs: list[EarlierRun], cfg: ModelConfig) -> EarlierRun | None:
    """The newest run of `cfg`'s architecture that logged an MFU (newest: it ran today's code)."""
    arch = tuple(getattr(cfg, f) for f in ARCH_FIELDS)
    return next((r for r in runs if r.arch == arch and r.mfu is not None), None)
