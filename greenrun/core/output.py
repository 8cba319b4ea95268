"""What the user sees, through one channel: a live progress bar on a terminal, plain lines in logs, the
end-of-run summary, and every message of every module through `logging` ("greenrun.*" loggers).

Messages at INFO go to stdout (dimmed on a terminal, above the progress bar); WARNING and above go to
stderr as `greenrun: ...`. Only rank 0 says anything below WARNING.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# soft_wrap: a log file keeps each line whole, so commands and paths copy and paste.
# Off a terminal there is no width to fit: tables get room for whole paths instead of 80 columns.
_LOG_WIDTH = None if sys.stdout.isatty() else 200
console = Console(highlight=False, soft_wrap=True, width=_LOG_WIDTH)  # stdout: progress, summaries, INFO
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # stderr: warnings and errors


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                err_console.print(f"greenrun: {text}", markup=False, soft_wrap=True)
            else:
                console.print(text, style="dim", markup=False, soft_wrap=True)
        except Exception:  # a broken pipe must not turn a message into a crash
            self.handleError(record)


def setup(main: bool = True) -> None:
    """Route every greenrun logger through the console (idempotent). Non-main ranks keep warnings only."""
    logger = logging.getLogger("greenrun")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO if main else logging.WARNING)


def say(text: str) -> None:
    """Plain text a command was asked for (help, usage, a result line): stdout, never wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A comparison table on stdout (e.g. the jobs of a sweep)."""
    out = Table(title=title)
    for name in header:
        out.add_column(name)
    for row in rows:
        out.add_row(*row)
    console.print(out)


def books(record: dict[str, Any]) -> str:
    """The run's spend so far in a logged record, e.g. '0.42 kWh 0.20 kgCO2e $1.37 (measured)'; "" unknown."""
    parts = []
    if record.get("j_per_token") is not None:
        parts.append(f"{record['j_per_token']:.3g} J/tok")
    for key, fmt in (("kwh", "{:.3g} kWh"), ("kgco2e", "{:.3g} kgCO2e"), ("usd", "${:.2f}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    if parts and record.get("energy_source"):
        parts.append(f"({record['energy_source']})")
    return " ".join(parts)


def ledger_rows(ledger: dict[str, Any]) -> list[tuple[str, str]]:
    """The whole run's ledger (summary.json's "ledger") as summary-table rows; unknown figures say so."""
    if not ledger:
        return []
    source = ledger.get("energy_source", "unknown")
    kwh, kg, usd = ledger.get("kwh"), ledger.get("kgco2e"), ledger.get("usd")
    rows = [
        ("energy", f"{kwh:.4g} kWh at the wall ({source}, PUE {ledger.get('pue')})" if kwh is not None
         else "unknown (no energy counter: set energy.cpu_watts to estimate)"),
        ("carbon", f"{kg:.4g} kg CO2e ({ledger.get('grid_source', '')})" if kg is not None else "unknown"),
        ("cost", f"${usd:.2f} for {ledger.get('gpu_hours', 0):.3g} GPU-hours" if usd is not None
         else "not priced (set energy.usd_per_gpu_hour)"),
    ]  # fmt: skip
    lost = ledger.get("preemption") or {}
    if lost.get("resumes"):
        kwh_lost = f", {lost['lost_kwh']:.3g} kWh" if lost.get("lost_kwh") is not None else ""
        rows.append(
            ("preemption", f"{lost['resumes']} resume(s): {lost.get('lost_steps', 0)} step(s) trained again"
             f"{kwh_lost}, {lost.get('wait_s', 0):.0f} s waiting")
        )  # fmt: skip
    return rows


class Reporter:
    """Only rank 0 reports; on a terminal a rich progress bar, elsewhere one line per logged step."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or globals()["console"]
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self._total, self._from, self._t0 = 0, 0, None

    def start(self, total: int, completed: int = 0) -> None:
        self._total, self._from, self._t0 = total, completed, time.monotonic()
        if not (self.enabled and self.live):
            return
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[books]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=completed, loss="-", tps="-", books=""
        )
        self.progress.start()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            fields = {"loss": f"{record['loss']:.4f}" if "loss" in record else "-"}
            if "tok_per_s" in record:
                fields["tps"] = f"{record['tok_per_s']:,.0f}"
            fields["books"] = books(record)
            self.progress.update(self.task, completed=record["step"], **fields)
            if "val_loss" in record:
                self.progress.console.print(f"step {record['step']}: val_loss {record['val_loss']:.4f}")
            return
        parts = [f"step {record['step']}"]
        for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("tok_per_s", ",.0f")):
            if key in record:
                parts.append(f"{key} {record[key]:{fmt}}")
        if spent := books(record):
            parts.append(spent)
        eta = self._eta(record["step"])
        if eta:
            parts.append(f"eta {eta}")
        self.console.print("  ".join(parts))

    def _eta(self, step: int) -> str:
        """Time left at the pace since start(), e.g. '3m12s': a slow run shows itself in the log."""
        if self._t0 is None or step <= self._from or step >= self._total:
            return ""
        left = (self._total - step) * (time.monotonic() - self._t0) / (step - self._from)
        return f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, result: dict[str, Any], run_dir: str, sample: str) -> None:
        if not self.enabled:
            return
        table = Table(title="greenrun summary", show_header=False)
        val = result.get("val_loss")
        first = result.get("first_val_loss")
        table.add_row("final val loss", "-" if val is None else f"{val:.4f}")
        if first and val is not None:
            table.add_row("first val loss", f"{first:.4f} ({100 * (1 - val / first):.0f}% lower now)")
        table.add_row("steps", str(result["step"]))
        table.add_row("tokens", f"{result['tokens']:,}")
        run_wall = result.get("run_wall_s", result["wall_s"])
        if run_wall > result["wall_s"]:  # resumed: the tokens count every process, so does this
            table.add_row(
                "wall time", f"{run_wall:.1f} s the whole run, {result['wall_s']:.1f} s this process"
            )
        else:
            table.add_row("wall time", f"{result['wall_s']:.1f} s")
        table.add_row("throughput", f"{result['tok_per_s']:,.0f} tok/s (this process)")
        for name, value in ledger_rows(result.get("ledger") or {}):
            table.add_row(name, value)
        table.add_row("run directory", run_dir)
        self.console.print(table)
        if sample:
            self.console.print("[bold]sample:[/bold]")
            self.console.print(sample, markup=False)
