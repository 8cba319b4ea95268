"""The report's figures as PNG bytes, drawn by matplotlib's Agg renderer.

Figures are built with matplotlib.figure.Figure and an Agg canvas rather than pyplot: no global figure state,
no GUI backend chosen behind the caller's back, and nothing left open after a report. Every run gets one colour
in every figure; resumes (dashed) and preemptions (dotted) are vertical lines in that colour on each token or
time axis. A panel that no run measured says "not measured" instead of drawing an empty or zero line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from greenrun.report import series
from greenrun.report.load import Run

DPI = 100
MARKERS = {"resume": "--", "preempt": ":"}  # event kind -> line style of its vertical line


@dataclass
class Plot:
    key: str  # the figure's id in the HTML (fig-<key>)
    title: str
    caption: str
    png: bytes
    not_measured: list[str]  # runs with no data in at least one panel (the panel says "not measured")


@dataclass
class _Ctx:
    """What every panel needs: the runs, their colours and axes, and the time unit all runs share."""

    runs: list[Run]
    tracks: list[series.Track]
    colors: list[str]
    time_div: float  # seconds per unit of the time axis
    time_label: str


def figures(runs: list[Run]) -> list[Plot]:
    """Loss, learning rate, throughput, power and the cumulative ledger, each run overlaid."""
    tracks = [series.track(r) for r in runs]
    longest = max(
        (float(t.seconds[-1]) for t in tracks if t.seconds is not None and len(t.seconds)), default=0
    )
    div, unit = (3600.0, "h") if longest >= 3 * 3600 else (60.0, "min") if longest >= 600 else (1.0, "s")
    estimated = [
        r.name for r, t in zip(runs, tracks, strict=True) if t.seconds is not None and t.seconds_estimated
    ]
    ctx = _Ctx(runs, tracks, [f"C{i % 10}" for i in range(len(runs))], div, f"training time ({unit})")
    time_note = (
        f" Time for {', '.join(estimated)} is estimated from the logged tok/s (no elapsed_s in its records)."
        if estimated
        else ""
    )
    return [
        _loss(ctx),
        _simple(ctx, "lr", "tokens", "learning rate", "Learning rate against tokens", "lr"),
        _simple(
            ctx,
            "tok_per_s",
            "seconds",
            "tokens/s",
            "Throughput against training time",
            "throughput",
            time_note,
        ),
        _power(ctx, time_note),
        _ledger(ctx, time_note),
    ]


# --- the figures ----------------------------------------------------------------------------------------


def _loss(ctx: _Ctx) -> Plot:
    fig, (ax,) = _new(1)
    drawn: set[int] = set()
    for i, (run, trk, color) in enumerate(zip(ctx.runs, ctx.tracks, ctx.colors, strict=True)):
        for key, style, label in (("loss", "-", "train"), ("val_loss", "--", "val")):
            steps, values = series.column(run, key)
            if len(steps):
                marker = "o" if key == "val_loss" else None
                ax.plot(
                    trk.at(steps, "tokens"),
                    values,
                    style,
                    color=color,
                    marker=marker,
                    markersize=3,
                    label=f"{run.name} {label}",
                )
                drawn.add(i)
    missing = _finish(ctx, ax, "tokens", "loss", drawn)
    return _plot(
        fig,
        "loss",
        "Train and validation loss against tokens",
        "Solid: training loss of each logged window; dashed with dots: validation loss.",
        missing,
    )


def _simple(ctx: _Ctx, key: str, axis: str, ylabel: str, title: str, fig_key: str, note: str = "") -> Plot:
    fig, (ax,) = _new(1)
    drawn: set[int] = set()
    for i, (run, trk, color) in enumerate(zip(ctx.runs, ctx.tracks, ctx.colors, strict=True)):
        steps, values = series.column(run, key)
        xs = trk.at(steps, axis) if len(steps) else None
        if xs is not None:
            ax.plot(_x(ctx, xs, axis), values, color=color, label=run.name)
            drawn.add(i)
    missing = _finish(ctx, ax, axis, ylabel, drawn)
    return _plot(fig, fig_key, title, f"{ylabel} as logged in metrics.jsonl.{note}", missing)


def _power(ctx: _Ctx, note: str) -> Plot:
    fig, (ax,) = _new(1)
    drawn: set[int] = set()
    hows: set[str] = set()
    for i, (run, trk, color) in enumerate(zip(ctx.runs, ctx.tracks, ctx.colors, strict=True)):
        steps, watts, how = series.power(run)
        xs = trk.at(steps, "seconds") if len(steps) else None
        if xs is not None:
            ax.plot(_x(ctx, xs, "seconds"), watts, color=color, label=run.name)
            drawn.add(i)
            hows.add(how)
    missing = _finish(ctx, ax, "seconds", "power (W)", drawn)
    how_text = " and ".join(sorted(hows)) if hows else "neither power_w nor device joules were logged"
    return _plot(fig, "power", "Power against training time", f"Source: {how_text}.{note}", missing)


def _ledger(ctx: _Ctx, note: str) -> Plot:
    fig, axes = _new(3)
    missing: list[str] = []
    for ax, (key, ylabel) in zip(axes, (("kwh", "kWh"), ("kgco2e", "kg CO2e"), ("usd", "$")), strict=True):
        drawn: set[int] = set()
        for i, (run, trk, color) in enumerate(zip(ctx.runs, ctx.tracks, ctx.colors, strict=True)):
            steps, values = series.column(run, key)
            xs = trk.at(steps, "seconds") if len(steps) else None
            if xs is not None:
                ax.plot(_x(ctx, xs, "seconds"), values, color=color, label=run.name)
                drawn.add(i)
        missing += [m for m in _finish(ctx, ax, "seconds", f"cumulative {ylabel}", drawn) if m not in missing]
    return _plot(
        fig,
        "ledger",
        "Cumulative energy, carbon and cost against training time",
        f"kWh at the wall, kg CO2e and dollars as the run's ledger logged them.{note}",
        missing,
    )


# --- shared pieces --------------------------------------------------------------------------------------


def _new(ncols: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(4.2 * ncols if ncols > 1 else 8.5, 3.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig then renders without any pyplot backend
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _x(ctx: _Ctx, xs: np.ndarray, axis: str) -> np.ndarray:
    return xs / ctx.time_div if axis == "seconds" else xs


def _finish(ctx: _Ctx, ax: Axes, axis: str, ylabel: str, drawn: set[int]) -> list[str]:
    """Labels, grid, event markers and a legend that names each run this panel has no data for (returned)."""
    ax.set_ylabel(ylabel)
    missing = [run.name for i, run in enumerate(ctx.runs) if i not in drawn]
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "not measured",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=14,
            color="0.45",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return missing
    ax.set_xlabel("tokens" if axis == "tokens" else ctx.time_label)
    if axis == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)
    kinds = _events(ctx, ax, axis)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", linestyle=MARKERS[k], label=k) for k in kinds]
    handles += [
        Line2D([], [], color=ctx.colors[i], alpha=0.4, label=f"{run.name}: not measured")
        for i, run in enumerate(ctx.runs)
        if i not in drawn
    ]
    ax.legend(handles=handles, fontsize=8)
    return missing


def _events(ctx: _Ctx, ax: Axes, axis: str) -> list[str]:
    """Draw each run's resume and preempt markers on this axis; return the kinds drawn (for the legend)."""
    drawn = []
    for run, trk, color in zip(ctx.runs, ctx.tracks, ctx.colors, strict=True):
        for kind, style in MARKERS.items():
            steps = [float(e["step"]) for e in series.events(run, kind)]
            xs = trk.at(steps, axis) if steps else None
            if xs is None:
                continue
            for x in _x(ctx, xs, axis):
                ax.axvline(x, color=color, linestyle=style, linewidth=1.2, alpha=0.8)
            drawn.append(kind)
    return [k for k in MARKERS if k in drawn]


def _plot(fig: Figure, key: str, title: str, caption: str, missing: list[str]) -> Plot:
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return Plot(key, title, caption, buf.getvalue(), missing)
