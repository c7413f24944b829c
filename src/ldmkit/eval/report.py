"""Sampler comparison report: a metrics table, FID-vs-NFE and CLIP-vs-FID plots (`ldmkit.eval.plots`)
and sample grids side by side, written as `report.md` (+ assets) and a self-contained `report.html`.

Plots are inline SVG (no plotting dependency); images are PNG data URIs, so the HTML file can be
mailed or attached to a W&B run as is.

A result row is a dict (missing or None metrics render as "n/a"): sampler, steps, guidance, nfe,
sec_per_image, peak_mem_mb, num_images and each metric's fields (`ldmkit.eval.metrics`), e.g. fid,
kid_mean, kid_std, clip_score, clip_model (the model that computed clip_score), prompt_accuracy
({"colour", "shape", "both"} or None). The table's columns come from the metrics (`report_columns`);
the notes on how the numbers were measured are given by the caller. Files are written atomically and
never replace an earlier report: a folder that holds one gets report-2.md, report-3.md, ...
Grids map a setting `(sampler, steps, guidance)`, a labelled group of a setting `(label, sampler, steps,
guidance)` (e.g. a prompt-suite category), or any label string to one image (PIL, uint8 (3, H, W) /
(H, W, 3), or float (3, H, W) in [-1, 1]).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldmkit.eval.files import free_stem, write_file, write_text
from ldmkit.eval.metrics.base import Column, fmt as _fmt, missing as _missing
from ldmkit.eval.plots import clip_vs_fid_svg, fid_vs_nfe_svgs, line_plot_svg  # noqa: F401 (re-exported)
from ldmkit.eval.pngmeta import to_pil_image

Row = Mapping[str, Any]
ACCURACY_KEYS = ("colour", "shape", "both")

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


def _num(value: Any) -> float:
    return float("inf") if _missing(value) else float(value)


def flatten_row(row: Row) -> dict[str, Any]:
    """Row with prompt_accuracy split into acc_colour / acc_shape / acc_both (for tables/CSV)."""
    flat = {k: v for k, v in row.items() if k != "prompt_accuracy"}
    for key in ACCURACY_KEYS:
        flat[f"acc_{key}"] = _acc(row, key)
    return flat


def scoring_models(rows: Sequence[Row]) -> list[str]:
    return sorted({str(r["clip_model"]) for r in rows if r.get("clip_model")})


def grid_label(key: Any) -> str:
    if isinstance(key, tuple) and len(key) == 3:
        sampler, steps, guidance = key
        return f"{sampler}, {steps} steps, guidance {guidance:g}"
    if isinstance(key, tuple) and len(key) == 4:
        label, sampler, steps, guidance = key
        return f"{label}: {sampler}, {steps} steps, guidance {guidance:g}"
    return str(key)


def _grid_sections(grids: Mapping[Any, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Group grids by (steps, guidance) so the samplers of one setting sit side by side."""
    labels = list(dict.fromkeys(key[0] for key in grids if isinstance(key, tuple) and len(key) == 4))

    def order(key: Any) -> tuple:
        if isinstance(key, tuple) and len(key) == 3:
            return (0, 0, _num(key[1]), _num(key[2]), str(key[0]))
        if isinstance(key, tuple) and len(key) == 4:  # labelled groups after the settings' own grids, in given order
            return (1, labels.index(key[0]), _num(key[2]), _num(key[3]), str(key[1]))
        return (2, 0, 0.0, 0.0, str(key))

    sections: dict[str, list[tuple[str, Any]]] = {}
    for key in sorted(grids, key=order):
        if isinstance(key, tuple) and len(key) == 3:
            sampler, steps, guidance = key
            sections.setdefault(f"{steps} steps, guidance {guidance:g}", []).append((str(sampler), grids[key]))
        elif isinstance(key, tuple) and len(key) == 4:
            label, sampler, steps, guidance = key
            sections.setdefault(f"{label}: {steps} steps, guidance {guidance:g}", []).append((str(sampler), grids[key]))
        else:
            sections.setdefault("samples", []).append((str(key), grids[key]))
    return list(sections.items())


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    to_pil_image(image).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


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
    for r in sorted_rows(rows):
        lines.append("| " + " | ".join(cell(c.cell(r)) for c in columns) + " |")
    lines += ["", "## Plots", ""] + [f"![plot]({p})" for p in plot_files] + [""]
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
td.na { color: #999; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figure img { image-rendering: pixelated; max-width: 100%; border: 1px solid #ccc; }
"""


def render_html(rows: Sequence[Row], grids: Mapping[Any, Any], title: str,
                prompts: Sequence[str] | None = None, notes: Sequence[str] = (),
                columns: Sequence[Column] | None = None) -> str:
    e = html.escape
    columns = report_columns() if columns is None else columns
    ordered = sorted_rows(rows)
    # Bold the best value per column that says which is better (e.g. lowest FID, highest CLIP score).
    best: dict[str, str] = {}
    for column in columns:
        if column.best in ("min", "max") and column.key:
            values = [r.get(column.key) for r in ordered if not _missing(r.get(column.key))]
            if values:
                best[column.header] = _fmt((min if column.best == "min" else max)(values), column.spec)

    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    out += [f"<p>{e(line)}</p>" for line in _header_lines(rows)]
    out += ["<h2>Metrics</h2>", '<table class="metrics" id="metrics">', "<thead><tr>"]
    out += [f"<th>{e(c.header)}</th>" for c in columns] + ["</tr></thead>", "<tbody>"]
    for r in ordered:
        cells = []
        for column in columns:
            header, text = column.header, column.cell(r)
            classes = ["na"] if text == "n/a" else []
            if header in best and text.split(" ± ")[0] == best[header]:
                classes.append("best")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{e(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody></table>", "<h2>Plots</h2>", '<div class="plots">']
    out += [*fid_vs_nfe_svgs(rows), clip_vs_fid_svg(rows), "</div>"]
    if grids:
        out.append("<h2>Samples (same prompts and seeds for every sampler)</h2>")
        if prompts:
            out.append("<ol class=\"prompts\">" + "".join(f"<li>{e(p)}</li>" for p in prompts) + "</ol>")
        for section, items in _grid_sections(grids):
            out += [f"<h3>{e(section)}</h3>", '<div class="grids">']
            for name, image in items:
                pil = to_pil_image(image)
                zoom = max(1, 256 // max(pil.width, 1))  # small grids: integer upscale, pixelated
                out.append(f'<figure><img alt="{e(name)}" width="{pil.width * zoom}" src="{png_data_uri(pil)}">'
                           f"<figcaption>{e(name)}</figcaption></figure>")
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
) -> dict[str, Path]:
    """Writes report.md (with report_assets/: grid PNGs, plot SVGs) and self-contained report.html into
    `out_dir`, with a section on how the numbers were measured (`notes`); returns their paths. An earlier
    report there is kept: this one gets the next free suffix (`suffix`: one already claimed)."""
    out_dir = Path(out_dir)
    suffix = claim_report_suffix(out_dir) if suffix is None else suffix
    assets = out_dir / f"report{suffix}_assets"
    assets.mkdir(parents=True, exist_ok=True)
    grids = dict(grids or {})

    grid_files: dict[Any, str] = {}
    for i, (key, image) in enumerate(grids.items()):
        name = f"grid_{i:02d}_" + "".join(c if c.isalnum() else "_" for c in grid_label(key))[:60] + ".png"
        data = png_bytes(image)
        write_file(assets / name, lambda f: f.write(data))
        grid_files[key] = f"{assets.name}/{name}"
    plot_files = []
    for i, svg in enumerate([*fid_vs_nfe_svgs(rows), clip_vs_fid_svg(rows)]):
        if svg.startswith("<svg"):
            name = f"plot_{i:02d}.svg"
            write_text(assets / name, svg)
            plot_files.append(f"{assets.name}/{name}")

    md = write_text(out_dir / f"report{suffix}.md",
                    render_markdown(rows, grid_files, plot_files, title, prompts, notes, columns))
    page = write_text(out_dir / f"report{suffix}.html", render_html(rows, grids, title, prompts, notes, columns))
    return {"markdown": md, "html": page, "assets": assets}


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
