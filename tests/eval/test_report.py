from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.eval.report import flatten_row, log_report_to_wandb, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SAMPLERS = ("ddim", "dpmpp_2m", "euler_a")


def make_rows() -> list[dict]:
    rows = []
    for i, sampler in enumerate(SAMPLERS):
        for steps in (10, 20, 50):
            for guidance in (1.0, 4.0):
                nfe = steps * (2 if guidance != 1.0 else 1)
                rows.append(dict(
                    sampler=sampler, steps=steps, guidance=guidance, nfe=nfe,
                    fid=40.0 / steps ** 0.5 + i + guidance, kid_mean=0.01 * (i + 1), kid_std=0.001,
                    clip_score=25.0 + guidance - i, prompt_accuracy={"colour": 0.9, "shape": 0.8, "both": 0.7},
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
        assert image.format == "PNG" and image.size == (66, 34)
        image.verify()
    # Nothing is fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', text)

    # Table content: the skipped-FID setting renders n/a in every metric column.
    heun = next(c for c in parser.cells if c[0] == "heun")
    assert heun[1:4] == ["10", "4", "38"] and heun[4:] == ["n/a"] * 8
    ddim = next(c for c in parser.cells if c[:3] == ["ddim", "20", "4"])
    assert ddim[4] == f"{40 / 20 ** 0.5 + 4:.2f}" and ddim[5] == "0.0100 ± 0.0010" and ddim[7] == "90.0%"
    assert "tiny-clip@shapes" in text  # which model scored

    # Plots: FID vs NFE per guidance (2 plots, one line per sampler; heun has no FID) + CLIP vs FID.
    assert parser.svgs == 3
    fid_nfe = [p["data-series"] for p in parser.polylines[:6]]
    assert fid_nfe == list(SAMPLERS) * 2
    assert len(parser.polylines) == 6 + len(SAMPLERS) * 3  # + one line per (sampler, steps)


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
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        target = paths["markdown"].parent / link
        assert target.is_file(), link
        if target.suffix == ".png":
            Image.open(target).verify()
        else:
            assert target.read_text().startswith("<svg")


def test_report_without_any_fid_says_so(tmp_path):
    rows = [dict(sampler="ddim", steps=10, guidance=4.0, nfe=20, fid=None, clip_score=30.0)]
    text = write_report(tmp_path, rows)["html"].read_text()
    assert "FID vs NFE (guidance 4): no data to plot" in text
    assert "<img" not in text


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
    assert {"acc_colour", "acc_shape", "acc_both", "fid", "clip_model"} <= set(table.columns)
    images = {k: v for k, v in payload.items() if k.startswith("eval/samples/")}
    assert len(images) == len(grids) and all(isinstance(v, wandb.Image) for v in images.values())
    assert "eval/samples/dpmpp_2m, 20 steps, guidance 4" in images
    assert flatten_row(rows[-1])["acc_both"] is None


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium); "
                    "the html.parser test above still checks the images and table")
def test_html_renders_in_headless_chromium(report, tmp_path):
    rows, grids, paths = report
    probe = """<script>
    window.addEventListener('load', () => {
      const imgs = [...document.images];
      document.body.dataset.imagesOk = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
      document.body.dataset.images = imgs.length;
      document.body.dataset.rows = document.querySelectorAll('#metrics tbody tr').length;
      document.body.dataset.svgs = [...document.querySelectorAll('svg')].filter(
        s => s.getBBox().width > 0).length;
    });
    </script></body>"""
    probed = tmp_path / "probe.html"
    probed.write_text(paths["html"].read_text(encoding="utf-8").replace("</body>", probe), encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, result.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="(\d+)"', body.group(1)))
    assert attrs == {"images-ok": str(len(grids)), "images": str(len(grids)), "rows": str(len(rows)), "svgs": "3"}
