"""What the user sees: a live progress bar on a terminal, plain lines in logs, and the end-of-run summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    """Only rank 0 reports; on a terminal a rich progress bar, elsewhere one line per logged step."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(highlight=False)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.last: dict[str, Any] = {}

    def start(self, total: int, completed: int = 0) -> None:
        if not (self.enabled and self.live):
            return
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total, completed=completed, loss="-", tps="-")
        self.progress.start()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.last = record
        if self.progress is not None:
            fields = {"loss": f"{record['loss']:.4f}" if "loss" in record else "-"}
            if "tok_per_s" in record:
                fields["tps"] = f"{record['tok_per_s']:,.0f}"
            self.progress.update(self.task, completed=record["step"], **fields)
            if "val_loss" in record:
                self.progress.console.print(f"step {record['step']}: val_loss {record['val_loss']:.4f}")
            return
        parts = [f"step {record['step']}"]
        for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("tok_per_s", ",.0f")):
            if key in record:
                parts.append(f"{key} {record[key]:{fmt}}")
        self.console.print("  ".join(parts))

    def note(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(f"[dim]{text}[/dim]")

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
        table.add_row("wall time", f"{result['wall_s']:.1f} s")
        table.add_row("throughput", f"{result['tok_per_s']:,.0f} tok/s")
        table.add_row("run directory", run_dir)
        self.console.print(table)
        if sample:
            self.console.print("[bold]sample:[/bold]")
            self.console.print(sample, markup=False)
