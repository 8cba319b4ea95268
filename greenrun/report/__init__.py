"""`greenrun report RUN_DIR|s3://… [RUN_DIR …]`: what one or several runs cost and how they trained.

Reads each run (load), derives its series and totals (series), prints one summary row per run in the terminal,
and writes one self-contained HTML file (html) with the figures (plots) and everyday equivalents
(runtime/equivalents). Reading only: a run that is still training can be reported, and no lock is taken.

    path = report.make(["runs/a", "s3://bucket/greenrun/b"], out=None)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from greenrun import __version__
from greenrun.core import output
from greenrun.core.fs import atomic_write
from greenrun.report import html, plots, series
from greenrun.report.load import ReportError, Run, load

__all__ = ["ReportError", "Run", "default_out", "load", "make"]

log = logging.getLogger(__name__)


def default_out(targets: list[str]) -> Path:
    """RUN_DIR/report.html for one local run; ./report.html for several runs or a run in a bucket."""
    if len(targets) == 1 and not targets[0].startswith("s3://"):
        return Path(targets[0]) / "report.html"
    return Path("report.html")


def make(targets: list[str], out: Path | None = None, storage_overrides: list[str] | None = None) -> Path:
    """Report `targets` (run directories or s3:// run URLs) side by side; returns the HTML file's path.

    Raises ReportError (exit 2: a path names no run; exit 1: a run or the output cannot be read or written).
    """
    if not targets:
        raise ReportError("report needs at least one RUN_DIR or s3://bucket/prefix/run", exit_code=2)
    runs = [load(t, storage_overrides) for t in targets]
    totals = [series.totals(r) for r in runs]
    output.table(
        "greenrun report", series.HEADER, [series.cells(r.name, t) for r, t in zip(runs, totals, strict=True)]
    )
    generated = f"generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by greenrun {__version__}"
    document = html.render(runs, totals, plots.figures(runs), generated)
    path = Path(out) if out is not None else default_out(targets)
    try:
        atomic_write(path, document)
    except OSError as e:  # UnsafePath (a symlink at the output) is one too
        raise ReportError(f"{path}: cannot write the report ({e}); choose another out=PATH") from None
    log.info(f"report written to {path}")
    return path
