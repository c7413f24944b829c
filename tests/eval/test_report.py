from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest

from ldmkit.eval.metrics.clip_score import CLIPScoreMetric
from ldmkit.eval.metrics.prompt_accuracy import PromptAccuracy
from ldmkit.eval.plots import NO_METRIC, metric_vs_nfe_svgs
from ldmkit.eval.report import (MAX_GRID_PX, MIN_CELL_PX, flatten_row, log_report_to_wandb, readable_grid,
                                table_marks, write_report)

SAMPLERS = ("ddim", "dpmpp_2m", "euler_a")
JUDGED = 68  # the quickstart's judged single-object prompts


def accuracy(colour: int, shape: int, both: int, n: int = JUDGED) -> dict:
    counts = {"colour": [colour, n], "shape": [shape, n], "both": [both, n]}
    return dict(prompt_accuracy={k: c / n for k, (c, _) in counts.items()}, prompt_accuracy_counts=counts)


def make_rows() -> list[dict]:
    rows = []
    for i, sampler in enumerate(SAMPLERS):
        for steps in (10, 20, 50):
            for guidance in (1.0, 4.0):
                nfe = steps * (2 if guidance != 1.0 else 1)
                rows.append(dict(
                    sampler=sampler, steps=steps, guidance=guidance, nfe=nfe,
                    fid=40.0 / steps ** 0.5 + i + guidance, kid_mean=0.01 * (i + 1), kid_std=0.001,
                    clip_score=25.0 + guidance - i, **accuracy(61, 54, 48 - 10 * i + steps // 10),
                    sec_per_image=0.01 * steps, peak_mem_mb=512.0, clip_model="tiny-clip@shapes",
                ))
    # a setting where FID was skipped (no Inception weights) and nothing else was measured
    rows.append(dict(sampler="heun", steps=10, guidance=4.0, nfe=38, fid=None, kid_mean=None, kid_std=None,
                     clip_score=float("nan"), prompt_accuracy=None, sec_per_image=None, peak_mem_mb=None,
                     clip_model="tiny-clip@shapes"))
    return rows


def make_grids() -> dict:
    gen = torch.Generator().manual_seed(0)
    grids = {}
    for sampler in SAMPLERS:
        grids[(sampler, 20, 4.0)] = torch.rand(3, 34, 66, generator=gen) * 2 - 1  # float [-1, 1]
    grids[("ddim", 50, 1.0)] = Image.new("RGB", (66, 34), (200, 10, 10))  # PIL
    grids["uint8 grid"] = (torch.rand(3, 34, 66, generator=gen) * 255).to(torch.uint8)
    return grids


def native_pixels(image) -> np.ndarray:
    from ldmkit.eval.pngmeta import to_pil_image

    return np.asarray(to_pil_image(image).convert("RGB"))  # (H, W, 3)


class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.cells, self.polylines, self.svgs = [], 0, [], [], 0
        self._in_body_row = self._in_tbody = self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self.rows += 1
            self.cells.append([])
        elif tag == "td":
            self._in_td = True
            self.cells[-1].append("")
        elif tag == "polyline":
            self.polylines.append(attrs)
        elif tag == "svg":
            self.svgs += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells[-1][-1] += data


@pytest.fixture
def report(tmp_path):
    rows, grids = make_rows(), make_grids()
    paths = write_report(tmp_path, rows, grids, prompts=["a red circle", "a blue square"])
    return rows, grids, paths


def test_html_is_self_contained_with_valid_images_and_all_rows(report):
    rows, grids, paths = report
    text = paths["html"].read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(text)

    assert parser.rows == len(rows)
    assert len(parser.images) == len(grids)
    for attrs in parser.images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size == (66 * 4, 34 * 4)  # 34 px samples, 4x: >= 128 px
        assert (int(attrs["width"]), int(attrs["height"])) == image.size
        image.verify()
    # Nothing is fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', text)

    # Table content: the skipped-FID setting renders n/a in every metric column.
    heun = next(c for c in parser.cells if c[0] == "heun")
    assert heun[1:4] == ["10", "4", "38"] and heun[4:] == ["n/a"] * 8
    ddim = next(c for c in parser.cells if c[:3] == ["ddim", "20", "4"])
    low, high = binomtest(61, JUDGED).proportion_ci(method="wilson")
    assert ddim[4] == f"{40 / 20 ** 0.5 + 4:.2f}" and ddim[5] == "0.0100 ± 0.0010"
    assert ddim[7] == f"{100 * 61 / JUDGED:.1f}% [{100 * low:.1f}–{100 * high:.1f}]"
    assert "tiny-clip@shapes" in text  # which model scored

    # Plots: every measured metric against NFE (FID, KID, CLIP score, three accuracies), one line per sampler
    # and guidance scale (heun measured nothing), and CLIP vs FID with one line per (sampler, steps).
    assert parser.svgs == 7
    per_metric = [f"{s}, w={g}" for s in SAMPLERS for g in (1, 4)]
    assert [p["data-series"] for p in parser.polylines[:6 * 6]] == per_metric * 6
    assert len(parser.polylines) == 6 * 6 + len(SAMPLERS) * 3


def test_markdown_and_assets(report):
    rows, grids, paths = report
    md = paths["markdown"].read_text(encoding="utf-8")
    metrics, samples = md.split("## Plots")
    table = [line for line in metrics.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    # Grid sections: samplers side by side per (steps, guidance), then the free-form label.
    assert re.findall(r"^### (.*)$", samples, re.M) == ["20 steps, guidance 4", "50 steps, guidance 1", "samples"]
    assert "| ddim | dpmpp_2m | euler_a |" in samples
    assert "| heun | 10 | 4 | 38 | n/a |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sum(link.endswith(".svg") for link in links) == 7 and sum(link.endswith(".png") for link in links) == 5
    for link in links:
        target = paths["markdown"].parent / link
        assert target.is_file(), link
        if target.suffix == ".png":
            Image.open(target).verify()
        else:
            assert target.read_text().startswith("<svg")


def test_grids_are_upscaled_by_pixel_replication_in_both_files(report):
    rows, grids, paths = report
    page = paths["html"].read_text(encoding="utf-8")
    uris = re.findall(r'<img [^>]* src="data:image/png;base64,([^"]+)"', page)
    shown = sorted(np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")).tobytes() for u in uris)
    # nearest neighbour, x4: every pixel becomes a 4x4 block
    expected = sorted(native_pixels(im).repeat(4, axis=0).repeat(4, axis=1).tobytes() for im in grids.values())
    assert len(shown) == len(grids) and shown == expected
    # report.md's PNG assets are the same upscaled images, byte for byte
    assets = sorted(paths["assets"].glob("grid_*.png"))
    assert sorted(a.read_bytes() for a in assets) == sorted(base64.b64decode(u) for u in uris)


def test_readable_grid_factor():
    strip = torch.zeros(3, 32, 8 * 32, dtype=torch.uint8)  # eight 32x32 samples in a row
    assert readable_grid(strip).size == (1024, 128)
    assert readable_grid(torch.zeros(3, 200, 400, dtype=torch.uint8)).size == (400, 200)  # readable already
    assert readable_grid(torch.zeros(3, 64, 64, dtype=torch.uint8), cell_size=32).size == (256, 256)
    assert readable_grid(torch.zeros(3, 32, 4096, dtype=torch.uint8)).size == (8192, 64)  # capped at MAX_GRID_PX
    assert MIN_CELL_PX == 128 and MAX_GRID_PX == 8192


def test_plots_every_measured_metric_when_fid_is_off(tmp_path):
    """The quickstart's report: FID off (no Inception weights), CLIP score and prompt accuracy measured."""
    samplers = ("ddim", "dpmpp_2m", "euler", "euler_a")
    rows = [dict(sampler=s, steps=n, guidance=4.0, nfe=n, fid=None, kid_mean=None, clip_score=28.0 + i + n / 10,
                 **accuracy(40 + i, 50, 30 + n // 10)) for i, s in enumerate(samplers) for n in (10, 20)]
    paths = write_report(tmp_path, rows)
    page, md = paths["html"].read_text(), paths["markdown"].read_text()
    assert "no data to plot" not in page and "no data to plot" not in md
    parser = ReportParser()
    parser.feed(page)
    titles = re.findall(r"<svg[^>]*>\s*<title>([^<]*)</title>", page)
    assert titles == ["CLIP score ↑ vs NFE", "colour acc ↑ vs NFE", "shape acc ↑ vs NFE", "both acc ↑ vs NFE"]
    assert [p["data-series"] for p in parser.polylines] == list(samplers) * 4  # one line per sampler
    assert page.count('class="error-bar"') == 3 * len(rows)  # the accuracies carry their intervals
    assert len(list(paths["assets"].glob("plot_*.svg"))) == 4


def test_a_report_with_no_metric_says_so(tmp_path):
    rows = [dict(sampler="ddim", steps=10, guidance=4.0, nfe=20, fid=None, clip_score=None)]
    paths = write_report(tmp_path, rows)
    for text in (paths["html"].read_text(), paths["markdown"].read_text()):
        assert NO_METRIC in text and "<svg" not in text and "<img" not in text
    assert not list(paths["assets"].iterdir())


def test_error_bars_span_the_wilson_interval():
    rows = [dict(sampler=s, steps=n, guidance=1.0, nfe=n, **accuracy(k, k, k, n=40)) for s, n, k in
            [("ddim", 10, 12), ("ddim", 20, 30), ("euler", 10, 2), ("euler", 20, 39)]]
    column = PromptAccuracy.columns[2]  # both acc
    (svg,) = metric_vs_nfe_svgs(rows, [column])
    circles = [float(y) for y in re.findall(r'<circle cx="[^"]+" cy="([^"]+)"', svg)]
    bar = r'class="error-bar" d="M[\d.]+,([\d.]+)h6M[\d.]+,[\d.]+V([\d.]+)'  # from low (y0) up to high (y1)
    bars = [(float(a), float(b)) for a, b in re.findall(bar, svg)]
    assert len(circles) == len(bars) == 4
    # points in drawing order (per series, by NFE): ddim 12, 30; euler 2, 39 of 40
    spans = []
    for (low_y, high_y), cy, k in zip(bars, circles, (12, 30, 2, 39)):
        low, high = binomtest(k, 40).proportion_ci(method="wilson")
        assert low_y >= cy >= high_y  # SVG y grows downwards: the marker sits inside its bar
        spans.append((low_y - high_y) / (high - low))
    np.testing.assert_allclose(spans, spans[0], rtol=0.02)  # bar length ∝ interval width, one scale


def test_differences_within_the_interval_of_the_best_are_marked(tmp_path):
    both = {"ddim": 53, "dpmpp_2m": 49, "euler": 43, "euler_a": 30}  # of 68; ddim best
    rows = [dict(sampler=s, steps=10, guidance=1.0, nfe=10, **accuracy(60, 60, k)) for s, k in both.items()]
    paths = write_report(tmp_path, rows)
    parser = ReportParser()
    parser.feed(paths["html"].read_text())
    best = 53 / JUDGED
    for cells in parser.cells:
        low, high = binomtest(both[cells[0]], JUDGED).proportion_ci(method="wilson")
        expect_mark = cells[0] != "ddim" and low <= best <= high
        assert cells[9].endswith(" ≈") == expect_mark, cells
    marked = {c[0] for c in parser.cells if c[9].endswith(" ≈")}
    assert marked == {"dpmpp_2m"}  # 49/68 [0.60, 0.81] holds 0.78; 43/68 [0.51, 0.73] does not
    page = paths["html"].read_text()
    assert page.count('<td class="best">') >= 4 and page.count('class="within"') == 1
    md = paths["markdown"].read_text()
    assert "| dpmpp_2m |" in md and md.count(" ≈ |") == 1 and "Wilson interval" in md


def test_a_bad_grid_writes_nothing(tmp_path):
    rows = make_rows()
    grids = {**make_grids(), ("ddim", 10, 1.0): torch.zeros(2, 3, 8, 8)}  # a batch, not one image
    with pytest.raises(ValueError, match=r"grid 'ddim, 10 steps, guidance 1' is not an image: .*\(2, 3, 8, 8\)"):
        write_report(tmp_path / "run", rows, grids)
    assert not (tmp_path / "run").exists()


def test_log_report_to_wandb_logs_table_and_images(monkeypatch):
    rows, grids = make_rows(), make_grids()
    log_report_to_wandb(rows, grids, run=None)  # no run: nothing happens, wandb not needed

    logged = []

    class FakeRun:
        def log(self, payload):
            logged.append(payload)

    log_report_to_wandb(rows, grids, FakeRun())
    import wandb

    (payload,) = logged
    table = payload["eval/results"]
    assert isinstance(table, wandb.Table) and len(table.data) == len(rows)
    assert {"acc_colour", "acc_shape", "acc_both", "acc_both_low", "acc_both_high", "fid", "clip_model"} <= set(
        table.columns)
    images = {k: v for k, v in payload.items() if k.startswith("eval/samples/")}
    assert len(images) == len(grids) and all(isinstance(v, wandb.Image) for v in images.values())
    assert "eval/samples/dpmpp_2m, 20 steps, guidance 4" in images
    assert flatten_row(rows[-1])["acc_both"] is None and flatten_row(rows[-1])["acc_both_low"] is None
    flat = flatten_row(rows[0])
    assert (flat["acc_colour_low"], flat["acc_colour_high"]) == pytest.approx(
        tuple(binomtest(61, JUDGED).proportion_ci(method="wilson")), rel=1e-12)
    assert "prompt_accuracy_counts" not in flat


def test_several_models_get_a_line_per_model_and_sampler():
    rows = [dict(model=m, sampler=s, steps=n, guidance=3.0, nfe=n, clip_score=20.0 + n + i)
            for i, m in enumerate(("vp", "flow")) for s in ("euler", "heun") for n in (3, 6)]
    (svg,) = metric_vs_nfe_svgs(rows, CLIPScoreMetric.columns)
    names = re.findall(r'data-series="([^"]+)"', svg)
    assert names == ["vp: euler", "vp: heun", "flow: euler", "flow: heun"]
    colours = re.findall(r'<polyline [^>]*stroke="(#[0-9a-f]{6})"', svg)
    assert len(set(colours)) == 4


def test_compositional_categories_are_plotted_and_marked_with_their_intervals(tmp_path):
    from ldmkit.eval.intervals import wilson_interval
    from ldmkit.eval.metrics.compositional import CompositionalSuite, field

    def row(sampler: str, steps: int, correct: int, n: int = 64) -> dict:
        low, high = wilson_interval(correct, n)
        return dict(sampler=sampler, steps=steps, guidance=3.0, nfe=steps, **{
            field("counting"): correct / n, field("counting", "_lo"): low, field("counting", "_hi"): high,
            field("counting", "_n"): n})

    rows = [row("ddim", 10, 50), row("ddim", 20, 56), row("euler", 10, 52), row("euler", 20, 30)]
    columns = CompositionalSuite.columns
    (svg,) = metric_vs_nfe_svgs(rows, columns)  # only counting was measured
    assert "counting acc ↑ [95% CI] vs NFE" in svg and svg.count('class="error-bar"') == 4
    marks = table_marks(rows, columns)
    # best 56/64: a row is marked where its own Wilson interval holds 0.875
    for i, r in enumerate(rows):
        low, high = r[field("counting", "_lo")], r[field("counting", "_hi")]
        expected = "best" if i == 1 else ("within" if low <= 56 / 64 <= high else None)
        assert marks.get((i, columns[0].header)) == expected
    header = columns[0].header
    assert [marks.get((i, header)) for i in range(4)] == [None, "best", "within", None]  # 50/64's interval ends below
