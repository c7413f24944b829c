"""Inline SVG line plots for the eval report (no plotting dependency): every measured metric against NFE,
one line per sampler (per sampler and guidance scale when there are several), with the metric's
confidence interval as error bars where it has one; and CLIP score against FID across guidance scales."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ldmkit.eval.metrics.base import Column, fmt as _fmt, missing as _missing

Row = Mapping[str, Any]
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
DASHES = ("", "6 3", "2 3", "8 3 2 3")  # one per guidance scale, cycled
NO_METRIC = "No metric was measured in this run: nothing to plot."


class Point(NamedTuple):
    x: float
    y: float
    label: str  # hover text
    note: str | None = None  # written beside the marker
    low: float | None = None  # error bar (confidence interval), if any
    high: float | None = None


class Style(NamedTuple):
    colour: str
    dash: str = ""


def _num(value: Any) -> float:
    return float("inf") if _missing(value) else float(value)


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        low, high = low - 1, high + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 0.5:
        ticks.append(round(value, 10))
        value += step
    return ticks


def line_plot_svg(
    series: Mapping[str, Sequence[Point | tuple]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    styles: Mapping[str, Style] | None = None,
    width: int = 520,
    height: int = 340,
) -> str:
    """One polyline with markers (and error bars where a point has low/high) per series."""
    series = {name: [Point(*p) for p in pts] for name, pts in series.items()}
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f'<p class="empty-plot">{html.escape(title)}: no data to plot (metric n/a).</p>'
    styles = dict(styles or {})
    legend_chars = max((len(name) for name in series), default=0)
    left, right, top, bottom = 64, 40 + 7 * legend_chars, 30, 46
    width += max(0, right - 130)  # grow the canvas for long legend names, keep the plot area
    plot_w, plot_h = width - left - right, height - top - bottom
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs = [tx(p.x) for p in points]
    ys = [y for p in points for y in (p.y, p.low, p.high) if y is not None]
    x_ticks = (
        [10**e * m for e in range(math.floor(min(xs)), math.ceil(max(xs)) + 1) for m in (1, 2, 5)]
        if log_x
        else _nice_ticks(min(xs), max(xs))
    )
    if log_x:
        x_ticks = [t for t in x_ticks if min(xs) - 0.05 <= math.log10(t) <= max(xs) + 0.05] or [10 ** min(xs)]
    y_ticks = _nice_ticks(min(ys), max(ys))
    x_lo, x_hi = min([*xs, *(tx(t) for t in x_ticks)]), max([*xs, *(tx(t) for t in x_ticks)])
    y_lo, y_hi = min([*ys, *y_ticks]), max([*ys, *y_ticks])
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def px(x: float) -> float:
        return left + (tx(x) - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{e(title)}</title>",
        f'<text x="{left + plot_w / 2}" y="18" text-anchor="middle" font-size="13">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>',
    ]
    for t in y_ticks:
        y = py(t)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in x_ticks:
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{e(x_label)}</text>')
    parts.append(
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">{e(y_label)}</text>'
    )
    # error bars of several series at one x would hide each other: dodge each series a few pixels sideways
    dodge = 5.0 if any(p.low is not None for p in points) else 0.0
    for i, (name, pts) in enumerate(series.items()):
        colour, dash = styles.get(name, Style(PALETTE[i % len(PALETTE)]))
        shift = (i - (len(series) - 1) / 2) * dodge

        def sx(x: float, shift: float = shift) -> float:
            return px(x) + shift

        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        pts = sorted(pts, key=lambda p: p.x)
        coords = " ".join(f"{sx(p.x):.1f},{py(p.y):.1f}" for p in pts)
        parts.append(f'<polyline class="series" data-series="{e(name)}" points="{coords}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"{dashed}/>')
        for p in pts:
            if p.low is not None and p.high is not None:
                x, y0, y1 = sx(p.x), py(p.low), py(p.high)
                parts.append(f'<path class="error-bar" d="M{x - 3:.1f},{y0:.1f}h6M{x:.1f},{y0:.1f}V{y1:.1f}'
                             f'M{x - 3:.1f},{y1:.1f}h6" stroke="{colour}" stroke-width="1" fill="none"/>')
            parts.append(f'<circle cx="{sx(p.x):.1f}" cy="{py(p.y):.1f}" r="3.5" fill="{colour}">'
                         f"<title>{e(p.label)}</title></circle>")
            if p.note:
                parts.append(f'<text x="{sx(p.x) + 5:.1f}" y="{py(p.y) - 5:.1f}" font-size="9" fill="{colour}">'
                             f"{e(p.note)}</text>")
        ly = top + 8 + 16 * i
        parts.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{ly}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"{dashed}/>')
        parts.append(f'<text x="{left + plot_w + 32}" y="{ly + 4}">{e(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def series_name(row: Row) -> str:
    """A row's sampler, prefixed by its model's label when the run compares several models (`ldmkit.eval.models`)."""
    return f"{row['model']}: {row.get('sampler')}" if row.get("model") else str(row.get("sampler"))


def metric_vs_nfe_svgs(rows: Sequence[Row], columns: Sequence[Column]) -> list[str]:
    """One plot per metric column measured in some row: its value against NFE, one line per sampler
    (colour) and guidance scale (dash pattern, when the run has several), error bars where the column
    has an interval."""
    guidances = sorted({r.get("guidance") for r in rows if not _missing(r.get("nfe"))}, key=_num)
    samplers = list(dict.fromkeys(series_name(r) for r in rows))  # row order: models as given, then samplers
    plots = []
    for column in columns:
        if not column.numeric:
            continue
        series: dict[str, list[Point]] = {}
        styles: dict[str, Style] = {}
        order: dict[str, tuple[int, int]] = {}
        for r in rows:
            y = column.number(r)
            if y is None or _missing(r.get("nfe")):
                continue
            sampler, guidance = series_name(r), r.get("guidance")
            name = sampler if len(guidances) < 2 else f"{sampler}, w={_fmt(guidance, 'g')}"
            order[name] = (samplers.index(sampler), guidances.index(guidance))
            styles[name] = Style(PALETTE[order[name][0] % len(PALETTE)],
                                 DASHES[order[name][1] % len(DASHES)] if len(guidances) > 1 else "")
            interval = column.interval(r) if column.interval is not None else None
            label = (f"{sampler}: {r.get('steps')} steps, guidance {_fmt(guidance, 'g')}, NFE {r['nfe']}, "
                     f"{column.header} {column.cell(r)}")
            series.setdefault(name, []).append(Point(r["nfe"], y, label, None, *(interval or (None, None))))
        if not series:
            continue
        nfes = [p.x for pts in series.values() for p in pts]
        log_x = min(nfes) > 0 and max(nfes) / min(nfes) >= 8
        ordered = {name: series[name] for name in sorted(series, key=order.__getitem__)}
        plots.append(line_plot_svg(ordered, title=f"{column.header} vs NFE",
                                   x_label="NFE (network evaluations per image)", y_label=column.header,
                                   log_x=log_x, styles=styles))
    return plots


def clip_vs_fid_svg(rows: Sequence[Row]) -> str | None:
    """CLIP score against FID, one line per (sampler, steps) through its guidance scales; None when no
    row has both."""
    series: dict[str, list] = {}
    for r in rows:
        if _missing(r.get("fid")) or _missing(r.get("clip_score")):
            continue
        name = f"{series_name(r)} / {r.get('steps')} steps"
        label = f"{name}, guidance {_fmt(r.get('guidance'), 'g')}: FID {r['fid']:.2f}, CLIP {r['clip_score']:.2f}"
        note = f"w={_fmt(r.get('guidance'), 'g')}"
        series.setdefault(name, []).append(Point(r["fid"], r["clip_score"], label, note))
    if not series:
        return None
    return line_plot_svg(series, title="CLIP score vs FID across guidance scales", x_label="FID ↓",
                         y_label="CLIP score ↑")


def report_plots(rows: Sequence[Row], columns: Sequence[Column]) -> list[str]:
    """Every plot of the report, in order: SVG strings, or one paragraph when nothing was measured."""
    plots = metric_vs_nfe_svgs(rows, columns)
    trade_off = clip_vs_fid_svg(rows)
    if trade_off is not None:
        plots.append(trade_off)
    return plots or [f'<p class="empty-plot">{html.escape(NO_METRIC)}</p>']
