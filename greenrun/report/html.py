"""The report as one self-contained HTML file: inline CSS, figures as base64 PNG data URIs, no script.

Nothing is fetched when it opens (no external stylesheet, font, image or script), so it can be mailed, archived
next to the run or opened offline. Every string that came from a run (names, paths, config values, labels) is
escaped: a bucket's files are written by whoever can write to the bucket.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from greenrun.report import series
from greenrun.report.load import Run, number
from greenrun.report.plots import Plot
from greenrun.runtime import equivalents

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; } figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9rem; } .none { color: #888; }
"""

# (label, path in config.yaml): the settings that explain a run's cost, shown per run.
SETTINGS = (
    ("model", ("model", "name")),
    ("layers", ("model", "n_layer")),
    ("width", ("model", "n_embd")),
    ("precision", ("precision", "name")),
    ("optimizer", ("optimizer", "name")),
    ("PUE", ("energy", "pue")),
    ("grid region", ("energy", "region")),  # newer configs: the region's intensity unless the next is > 0
    ("grid kg CO2e/kWh", ("energy", "grid_kg_per_kwh")),
    ("pricing", ("energy", "pricing")),
    ("$/GPU-hour", ("energy", "usd_per_gpu_hour")),
)


def render(runs: list[Run], totals: list[dict[str, Any]], plots: list[Plot], generated: str) -> str:
    """The whole document; `generated` is the line under the title (when and by which greenrun)."""
    names = ", ".join(r.name for r in runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>greenrun report: {escape(names)}</title><style>{CSS}</style></head><body>",
        "<h1>greenrun report</h1>",
        f'<p class="meta">{escape(generated)}</p>',
        "<h2>Runs</h2>",
        _table(["run", "read from"], [[r.name, r.source] for r in runs], id_="runs"),
        "<h2>Summary</h2>",
        _table(
            series.HEADER, [series.cells(r.name, t) for r, t in zip(runs, totals, strict=True)], id_="summary"
        ),
        "<h2>Everyday equivalents</h2>",
        _equivalents(runs, totals),
        "<h2>Resumes and preemptions</h2>",
        _events(runs),
        "<h2>Figures</h2>",
        *(_figure(p) for p in plots),
        "<h2>Settings</h2>",
        _table(
            ["run", *(label for label, _ in SETTINGS)],
            [[r.name, *(_setting(r.config, path) for _, path in SETTINGS)] for r in runs],
            id_="settings",
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table(header: list[str], rows: list[list[str]], id_: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{_cls(c)}>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cls(cell: str) -> str:
    """Numbers align right; words (names, labels, sources) align left."""
    digits = cell.replace(",", "").replace(".", "").replace(":", "").replace("-", "").replace(" ", "")
    return "" if digits.isdigit() or cell == "-" else ' class="text"'


def _equivalents(runs: list[Run], totals: list[dict[str, Any]]) -> str:
    header = ["run", "kWh", "kg CO2e", *(eq.label for eq in equivalents.EQUIVALENTS)]
    rows = []
    for run, t in zip(runs, totals, strict=True):
        counts = equivalents.compute(t["kwh"], t["kgco2e"])
        rows.append(
            [
                run.name,
                "-" if t["kwh"] is None else f"{t['kwh']:.4g}",
                "-" if t["kgco2e"] is None else f"{t['kgco2e']:.4g}",
                *(
                    "-" if counts[eq.key] is None else f"{counts[eq.key]:.3g}"
                    for eq in equivalents.EQUIVALENTS
                ),
            ]
        )
    sources = [[eq.label, eq.factor_text, eq.source] for eq in equivalents.EQUIVALENTS]
    return (
        _table(header, rows, id_="equivalents")
        + "<p>Each count is the run's kg CO2e (or, for phone charges, its kWh at the wall) divided by the "
        'factor below; "-" where the run did not measure that quantity.</p>'
        + _table(["equivalent", "factor", "source"], sources, id_="equivalent-sources")
    )


def _events(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        for e in run.events:
            rows.append(
                [
                    run.name,
                    str(e.get("event", "?")),
                    str(e.get("step", "-")),
                    *(_fmt(number(e.get(k))) for k in ("lost_steps", "lost_s", "wait_s")),
                ]
            )
    if not rows:
        return '<p class="none">No resume or preemption was recorded.</p>'
    return _table(
        ["run", "event", "step", "steps lost", "seconds lost", "seconds waited"], rows, id_="events"
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def _setting(cfg: dict[str, Any], path: tuple[str, ...]) -> str:
    value: Any = cfg
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "-" if value is None or isinstance(value, dict | list) else str(value)


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    caption = plot.caption + (f" Not measured: {', '.join(plot.not_measured)}." if plot.not_measured else "")
    return (
        f'<figure id="fig-{plot.key}"><img class="plot" alt="{escape(plot.title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{escape(caption)}</figcaption></figure>'
    )
