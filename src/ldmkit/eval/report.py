"""Sampler comparison report: a metrics table (accuracies with 95% Wilson intervals, `≈` where the best
value lies inside a row's interval), every measured metric against NFE and CLIP-vs-FID plots
(`ldmkit.eval.plots`), and sample grids side by side, written as `report.md` (+ assets) and a
self-contained `report.html`.

Plots are inline SVG (no plotting dependency); images are PNG data URIs, so the HTML file can be
mailed or attached to a W&B run as is. Grids are upscaled by an integer factor with nearest-neighbour
(pixel replication: nothing is invented or smoothed) until a sample is at least MIN_CELL_PX tall, in
the PNG itself, so report.md (which cannot carry CSS) shows them at a readable size too.

A result row is a dict (missing or None metrics render as "n/a"): sampler, steps, guidance, nfe,
sec_per_image, peak_mem_mb, num_images and each metric's fields (`ldmkit.eval.metrics`), e.g. fid,
kid_mean, kid_std, clip_score, clip_model (the model that computed clip_score), prompt_accuracy
({"colour", "shape", "both"} or None) with prompt_accuracy_counts ({key: [correct, judged]}). The
table's columns come from the metrics (`report_columns`); the notes on how the numbers were measured
are given by the caller. Files are written atomically and never replace an earlier report: a folder that
holds one gets report-2.md, report-3.md, ...
Grids map a setting `(sampler, steps, guidance)`, a labelled group of a setting `(label, sampler, steps,
guidance)` (e.g. a prompt-suite category), or any label string to one image (PIL, uint8 (3, H, W) /
(H, W, 3), or float (3, H, W) in [-1, 1]): a row of samples, so a sample is as tall as the image
(`cell_size` says otherwise).
Everything is rendered in memory before the first file is written: a bad input fails with nothing
written, and a finished report is never half there.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldmkit.eval.files import free_stem, write_file, write_text
from ldmkit.eval.grids import (  # noqa: F401 (MAX_GRID_PX, MIN_CELL_PX, readable_grid: re-exported for readers of the report)
    MAX_GRID_PX, MIN_CELL_PX, _grid_sections, _num, grid_label, png_bytes, png_data_uri, readable_grid,
)
from ldmkit.eval.intervals import CONFIDENCE, within
from ldmkit.eval.metrics.base import Column, fmt as _fmt, missing as _missing
from ldmkit.eval.plots import NO_METRIC, clip_vs_fid_svg, line_plot_svg, metric_vs_nfe_svgs, report_plots  # noqa: F401
from ldmkit.eval.pngmeta import to_pil_image

Row = Mapping[str, Any]
ACCURACY_KEYS = ("colour", "shape", "both")
WITHIN_MARK = "≈"

DEFAULT_METRICS = ("fid", "kid", "clip_score", "prompt_accuracy")  # conf/eval.yaml's metrics, in order
LEADING = (
    Column("sampler", lambda r: str(r.get("sampler", "n/a"))),
    Column("steps", lambda r: _fmt(r.get("steps"), "d")),
    Column("guidance", lambda r: _fmt(r.get("guidance"), "g")),
    Column("NFE", lambda r: _fmt(r.get("nfe"), "d")),
)
TRAILING = (
    Column("s / image", lambda r: _fmt(r.get("sec_per_image"), ".3g")),
    Column("peak mem (MB)", lambda r: _fmt(r.get("peak_mem_mb"), ".0f")),
)


def report_columns(metric_classes: Sequence[Any] | None = None) -> tuple[Column, ...]:
    """The table's columns: setting and NFE, each metric's own columns (on or off: n/a), timing and memory.
    None: the default metrics."""
    if metric_classes is None:
        from ldmkit.eval.metrics import metric_classes as known

        classes = known()
        metric_classes = [classes[name] for name in DEFAULT_METRICS]
    return (*LEADING, *(c for cls in metric_classes for c in cls.columns), *TRAILING)


# --- formatting ----------------------------------------------------------------------------


def _acc(row: Row, key: str) -> float | None:
    accuracy = row.get("prompt_accuracy")
    return accuracy.get(key) if isinstance(accuracy, Mapping) else None


def sorted_rows(rows: Sequence[Row]) -> list[Row]:
    def key(r: Row):
        return (str(r.get("sampler")), _num(r.get("steps")), _num(r.get("guidance")))

    return sorted(rows, key=key)


def flatten_row(row: Row) -> dict[str, Any]:
    """Row with prompt_accuracy split into acc_colour / acc_shape / acc_both and their 95% Wilson
    intervals acc_<key>_low / acc_<key>_high (for tables/CSV)."""
    from ldmkit.eval.intervals import interval_of

    flat = {k: v for k, v in row.items() if k not in ("prompt_accuracy", "prompt_accuracy_counts")}
    for key in ACCURACY_KEYS:
        flat[f"acc_{key}"] = _acc(row, key)
        interval = interval_of(row, "prompt_accuracy_counts", key)
        flat[f"acc_{key}_low"], flat[f"acc_{key}_high"] = interval if interval else (None, None)
    return flat


def scoring_models(rows: Sequence[Row]) -> list[str]:
    return sorted({str(r["clip_model"]) for r in rows if r.get("clip_model")})


# --- table ---------------------------------------------------------------------------------


def table_marks(rows: Sequence[Row], columns: Sequence[Column]) -> dict[tuple[int, str], str]:
    """(row index, header) -> "best" for each column's best value (min or max, as formatted), or "within"
    where the column has intervals and the best value lies inside this row's: the difference from the best
    is within the sampling uncertainty."""
    marks: dict[tuple[int, str], str] = {}
    for column in columns:
        if column.best not in ("min", "max") or not column.numeric:
            continue
        values = [column.number(r) for r in rows]
        measured = [v for v in values if v is not None]
        if not measured:
            continue
        best = (min if column.best == "min" else max)(measured)
        for i, (row, value) in enumerate(zip(rows, values)):
            if value is None:
                continue
            if _fmt(value, column.spec) == _fmt(best, column.spec):
                marks[(i, column.header)] = "best"
            elif column.interval is not None and within(column.interval(row), best):
                marks[(i, column.header)] = "within"
    return marks


def interval_legend(columns: Sequence[Column]) -> str | None:
    if not any(c.interval is not None for c in columns):
        return None
    return (f"Rates are shown as value [low–high], the {100 * CONFIDENCE:g}% Wilson interval of the binomial rate. "
            f"{WITHIN_MARK}: the column's best value lies inside this row's interval, i.e. the difference from "
            "the best is within the sampling uncertainty (more prompts would be needed to tell them apart).")


def _cells(rows: Sequence[Row], columns: Sequence[Column]) -> list[list[tuple[str, str | None]]]:
    """The table's cell texts and marks, rows in report order."""
    marks = table_marks(rows, columns)
    table = []
    for i, row in enumerate(rows):
        cells = []
        for column in columns:
            mark = marks.get((i, column.header))
            text = column.cell(row)
            cells.append((f"{text} {WITHIN_MARK}" if mark == "within" else text, mark))
        table.append(cells)
    return table


# --- markdown ------------------------------------------------------------------------------


def _header_lines(rows: Sequence[Row]) -> list[str]:
    models = scoring_models(rows)
    return [f"{len(rows)} settings; CLIP score computed by: {', '.join(models) if models else 'n/a'}."]


def notes_markdown(notes: Sequence[str]) -> list[str]:
    return ["", "## How these numbers were measured", "", *[f"- {n}" for n in notes], ""] if notes else []


def render_markdown(rows: Sequence[Row], grid_files: Mapping[Any, str], plot_files: Sequence[str],
                    title: str, prompts: Sequence[str] | None = None, notes: Sequence[str] = (),
                    columns: Sequence[Column] | None = None) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    columns = report_columns() if columns is None else columns
    lines = [f"# {title}", "", *_header_lines(rows), "", "## Metrics", ""]
    lines.append("| " + " | ".join(c.header for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for cells in _cells(sorted_rows(rows), columns):
        lines.append("| " + " | ".join(cell(text) for text, _ in cells) + " |")
    legend = interval_legend(columns)
    lines += ["", legend] if legend else []
    lines += ["", "## Plots", ""] + [f"![plot]({p})" if p.endswith(".svg") else p for p in plot_files] + [""]
    if grid_files:
        lines += ["## Samples (same prompts and seeds for every sampler)", ""]
        if prompts:
            lines += ["Prompts: " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)), ""]
        for section, items in _grid_sections(grid_files):
            lines += [f"### {section}", "", "| " + " | ".join(cell(n) for n, _ in items) + " |",
                      "|" + "|".join("---" for _ in items) + "|",
                      "| " + " | ".join(f"![{cell(n)}]({f})" for n, f in items) + " |", ""]
    return "\n".join(lines) + "\n".join(notes_markdown(notes))


# --- html ----------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table.metrics { border-collapse: collapse; font-size: 14px; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.metrics td:first-child, table.metrics th:first-child { text-align: left; }
table.metrics tr:nth-child(even) td { background: #f6f6f6; }
td.best { font-weight: bold; }
td.within { color: #555; }
td.na { color: #999; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figure img { image-rendering: pixelated; max-width: 100%; height: auto; border: 1px solid #ccc; }
"""


def render_html(rows: Sequence[Row], grids: Mapping[Any, Any], title: str,
                prompts: Sequence[str] | None = None, notes: Sequence[str] = (),
                columns: Sequence[Column] | None = None, plots: Sequence[str] | None = None,
                cell_size: int | None = None, upscale: bool = True) -> str:
    """The self-contained page; `plots` (`report_plots`) are made here when not given, grids upscaled to
    a readable size (`readable_grid`) unless `upscale` is False (they already are)."""
    e = html.escape
    columns = report_columns() if columns is None else columns
    plots = report_plots(rows, columns) if plots is None else plots
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    out += [f"<p>{e(line)}</p>" for line in _header_lines(rows)]
    out += ["<h2>Metrics</h2>", '<table class="metrics" id="metrics">', "<thead><tr>"]
    out += [f"<th>{e(c.header)}</th>" for c in columns] + ["</tr></thead>", "<tbody>"]
    for cells in _cells(sorted_rows(rows), columns):
        row = []
        for text, mark in cells:
            classes = (["na"] if text == "n/a" else []) + ([mark] if mark else [])
            cls = f' class="{" ".join(classes)}"' if classes else ""
            tip = ' title="the best value lies inside this interval"' if mark == "within" else ""
            row.append(f"<td{cls}{tip}>{e(text)}</td>")
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</tbody></table>")
    legend = interval_legend(columns)
    if legend:
        out.append(f'<p class="legend">{e(legend)}</p>')
    out += ["<h2>Plots</h2>", '<div class="plots">', *plots, "</div>"]
    if grids:
        out.append("<h2>Samples (same prompts and seeds for every sampler)</h2>")
        if prompts:
            out.append("<ol class=\"prompts\">" + "".join(f"<li>{e(p)}</li>" for p in prompts) + "</ol>")
        for section, items in _grid_sections(grids):
            out += [f"<h3>{e(section)}</h3>", '<div class="grids">']
            for name, image in items:
                pil = readable_grid(image, cell_size) if upscale else to_pil_image(image)
                out.append(f'<figure><img alt="{e(name)}" width="{pil.width}" height="{pil.height}" '
                           f'src="{png_data_uri(pil)}"><figcaption>{e(name)}</figcaption></figure>')
            out.append("</div>")
    if notes:
        out.append("<h2>How these numbers were measured</h2><ul class=\"notes\">"
                   + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def report_names(suffix: str) -> list[str]:
    """What one eval run writes into its folder (suffix "" for the first report, "-2", ... after)."""
    return [f"report{suffix}.md", f"report{suffix}.html", f"report{suffix}_assets", f"metrics{suffix}.json",
            f"images{suffix}"]


def claim_report_suffix(out_dir: str | os.PathLike) -> str:
    """A suffix none of whose `report_names` exist in `out_dir`, claimed by creating its assets folder."""
    return free_stem(Path(out_dir), report_names, lambda suffix: f"report{suffix}_assets")


def release_report_suffix(out_dir: str | os.PathLike, suffix: str) -> None:
    """Give back a claimed suffix after a failed run: its assets folder goes if still empty (nothing else is
    ever removed), so a failed run leaves no report behind and the next run gets the same names."""
    try:
        (Path(out_dir) / f"report{suffix}_assets").rmdir()  # fails, and keeps it, unless empty
    except OSError:
        pass


def write_report(
    out_dir: str | os.PathLike,
    rows: Sequence[Row],
    grids: Mapping[Any, Any] | None = None,
    *,
    title: str = "ldmkit sampler evaluation",
    prompts: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    columns: Sequence[Column] | None = None,
    suffix: str | None = None,
    cell_size: int | None = None,
) -> dict[str, Path]:
    """Writes report.md (with report_assets/: grid PNGs, plot SVGs) and self-contained report.html into
    `out_dir`, with a section on how the numbers were measured (`notes`); returns their paths. An earlier
    report there is kept: this one gets the next free suffix (`suffix`: one already claimed). Every file's
    content is made before the first is written, so bad input (a grid that is not an image, ...) fails
    with nothing written."""
    columns = report_columns() if columns is None else columns
    shown = {}
    for key, image in dict(grids or {}).items():
        try:
            shown[key] = readable_grid(image, cell_size)
        except (TypeError, ValueError) as err:
            raise ValueError(f"grid '{grid_label(key)}' is not an image: {err}; nothing was written") from err
    plots = report_plots(rows, columns)
    page = render_html(rows, shown, title, prompts, notes, columns, plots, upscale=False)

    out_dir = Path(out_dir)
    suffix = claim_report_suffix(out_dir) if suffix is None else suffix
    assets = out_dir / f"report{suffix}_assets"
    files: dict[str, bytes] = {}
    grid_files: dict[Any, str] = {}
    for i, (key, image) in enumerate(shown.items()):
        name = f"grid_{i:02d}_" + "".join(c if c.isalnum() else "_" for c in grid_label(key))[:60] + ".png"
        files[name], grid_files[key] = png_bytes(image), f"{assets.name}/{name}"
    plot_files = []
    for i, svg in enumerate(p for p in plots if p.startswith("<svg")):
        name = f"plot_{i:02d}.svg"
        files[name] = svg.encode("utf-8")
        plot_files.append(f"{assets.name}/{name}")
    markdown = render_markdown(rows, grid_files, plot_files or [NO_METRIC], title, prompts, notes, columns)

    assets.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_file(assets / name, lambda f, data=data: f.write(data))
    md = write_text(out_dir / f"report{suffix}.md", markdown)
    html_path = write_text(out_dir / f"report{suffix}.html", page)
    return {"markdown": md, "html": html_path, "assets": assets}


def write_metrics_json(out_dir: str | os.PathLike, rows: Sequence[Row], notes: Sequence[str], suffix: str = "") -> Path:
    """metrics.json: the rows and notes of the report with the same suffix."""
    text = json.dumps({"rows": list(rows), "notes": list(notes)}, indent=2, default=str)
    return write_text(Path(out_dir) / f"metrics{suffix}.json", text)


def log_report_to_wandb(rows: Sequence[Row], grids: Mapping[Any, Any] | None, run: Any,
                        prefix: str = "eval") -> None:
    """Logs the metrics as a wandb.Table and each grid as a wandb.Image; no-op when run is None."""
    if run is None:
        return
    import wandb

    flat = [flatten_row(r) for r in sorted_rows(rows)]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat])
    payload: dict[str, Any] = {f"{prefix}/results": table}
    for key, image in (grids or {}).items():
        label = grid_label(key)
        payload[f"{prefix}/samples/{label}"] = wandb.Image(to_pil_image(image).convert("RGB"), caption=label)
    run.log(payload)
