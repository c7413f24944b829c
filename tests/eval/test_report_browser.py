"""The HTML report as a browser shows it: headless Chromium loads report.html, a probe script reports the
layout (every table row, image and plot with its box on the page), and a screenshot of the same page is
checked where the probe says things are: each grid shows its PNG's pixels at the upscaled size, each plot
draws every series' colour, the table draws its borders and text.

`make test` installs Chromium when it is missing (Debian's `chromium`) and sets LDMKIT_REQUIRE_BROWSER=1,
so on CI this test runs or fails, never skips; a bare `pytest` without Chromium skips it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ldmkit.eval.report import MIN_CELL_PX, report_columns, write_report
from tests.eval.test_report import make_grids, make_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("LDMKIT_REQUIRE_BROWSER") == "1"
WINDOW = (1600, 5000)  # the whole test report fits: one screenshot shows everything

PROBE = """<script>
window.addEventListener('load', () => {
  const box = el => { const r = el.getBoundingClientRect();
                      return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]; };
  const table = document.querySelector('#metrics');
  const probe = {
    page: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
    table: {box: box(table), cells: [...table.querySelectorAll('tbody tr')].map(tr => tr.cells.length)},
    images: [...document.images].map(i => { const [x, y] = box(i);  // the content box: inside the border
      return {complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
              box: [x + i.clientLeft, y + i.clientTop, i.clientWidth, i.clientHeight]}; }),
    plots: [...document.querySelectorAll('svg.plot')].map(s => ({
      title: s.querySelector('title').textContent, box: box(s),
      lines: s.querySelectorAll('polyline').length,
      colours: [...new Set([...s.querySelectorAll('polyline')].map(p => p.getAttribute('stroke')))]})),
  };
  document.documentElement.dataset.probe = JSON.stringify(probe);
});
</script></body>"""


def chromium_or_skip() -> str:
    if CHROMIUM is None:
        message = ("Chromium is not installed: `make test` installs it (Debian: apt-get install -y chromium); "
                   "the html.parser tests in test_report.py still check the images and the table")
        if REQUIRED:
            pytest.fail(f"LDMKIT_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    return CHROMIUM


def render(page: str, tmp_path) -> tuple[dict, np.ndarray]:
    """(the probe's layout, the screenshot (H, W, 3)) of `page` in headless Chromium."""
    probed, shot = tmp_path / "probe.html", tmp_path / "screenshot.png"
    probed.write_text(page.replace("</body>", PROBE), encoding="utf-8")
    result = subprocess.run(
        [chromium_or_skip(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
         f"--screenshot={shot}", probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<html[^>]*\sdata-probe="([^"]*)"', result.stdout)
    assert found and shot.is_file(), f"Chromium rendered nothing (rc {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1))), np.asarray(Image.open(shot).convert("RGB")).astype(int)


def crop(screenshot: np.ndarray, box: list[float]) -> np.ndarray:
    x, y, w, h = (round(v) for v in box)
    return screenshot[y : y + h, x : x + w]


def pixels_near(region: np.ndarray, colour: str, tolerance: int = 12) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(region - rgb).max(axis=-1) <= tolerance).sum())


def test_report_renders_table_plots_and_grids_in_headless_chromium(tmp_path):
    rows, grids = make_rows(), make_grids()
    paths = write_report(tmp_path / "run", rows, grids, prompts=["a red circle", "a blue square"])
    page = paths["html"].read_text(encoding="utf-8")
    probe, screenshot = render(page, tmp_path)
    assert probe["page"][1] <= WINDOW[1] and probe["page"][0] <= WINDOW[0], f"raise WINDOW: the page is {probe['page']}"
    assert screenshot.shape[:2] == (WINDOW[1], WINDOW[0])

    # The table: every row with every column, drawn (grey borders, dark text).
    assert probe["table"]["cells"] == [len(report_columns())] * len(rows)
    table = crop(screenshot, probe["table"]["box"])
    assert pixels_near(table, "#cccccc", 8) > 1000 and pixels_near(table, "#222222", 40) > 1000

    # Every grid: loaded, shown at its upscaled size (a sample >= MIN_CELL_PX tall), pixels as in its PNG.
    pngs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")).astype(int)
            for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert len(probe["images"]) == len(pngs) == len(grids)
    for image, png in zip(probe["images"], pngs):
        assert image["complete"] and image["natural"] == [png.shape[1], png.shape[0]]
        assert image["box"][2:] == image["natural"] and image["box"][3] >= MIN_CELL_PX
        shown = crop(screenshot, image["box"])
        assert shown.shape == png.shape
        assert np.abs(shown - png).max() <= 3, "the grid on screen is not its PNG (smoothed, shifted or blank)"

    # Every plot: drawn, each series' colour on screen (lines and markers).
    assert [p["title"] for p in probe["plots"]] == [
        "FID ↓ vs NFE", "KID ↓ vs NFE", "CLIP score ↑ vs NFE", "colour acc ↑ vs NFE", "shape acc ↑ vs NFE",
        "both acc ↑ vs NFE", "CLIP score vs FID across guidance scales"]
    for plot in probe["plots"]:
        assert plot["box"][2] > 300 and plot["box"][3] > 200 and plot["lines"] >= 3
        region = crop(screenshot, plot["box"])
        for colour in plot["colours"]:
            assert pixels_near(region, colour) >= 30, f"{plot['title']}: no {colour} line on screen"


# --- `make test` gets the browser: the Makefile's `browser` target, with fake id / apt-get on an empty PATH ---

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKE = shutil.which("make")


def fake_bin(tmp_path, uid: int, chromium: bool = False, stale_lists: bool = False):
    """A PATH with only `id` (printing `uid`), `env`, and an `apt-get` that logs its calls (and, when
    `stale_lists`, fails to install until `update` ran) and installs a fake `chromium`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "apt.log"
    (bin_dir / "id").write_text(f"#!/bin/bash\necho {uid}\n")
    (bin_dir / "apt-get").write_text(f"""#!/bin/bash
echo "$DEBIAN_FRONTEND $*" >> {log}
read -t 0.1 -r line && echo "stdin: $line" >> {log}
if [[ " $* " == *" update "* ]]; then : > {tmp_path}/updated; exit 0; fi
if {str(stale_lists).lower()} && [ ! -e {tmp_path}/updated ]; then echo "E: Unable to locate package chromium" >&2; exit 100; fi
printf '#!/bin/bash\\n' > {bin_dir}/chromium && {shutil.which("chmod")} +x {bin_dir}/chromium
""")
    if chromium:
        (bin_dir / "chromium").write_text("#!/bin/bash\n")
    os.symlink(shutil.which("env"), bin_dir / "env")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir, log


def make_browser(bin_dir) -> subprocess.CompletedProcess:
    return subprocess.run([MAKE, "-s", "-f", os.path.join(REPO, "Makefile"), "browser"], cwd=REPO,
                          env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60, stdin=subprocess.PIPE)


@pytest.mark.skipif(MAKE is None, reason="make not installed")
def test_make_installs_chromium_as_root_non_interactively(tmp_path):
    bin_dir, log = fake_bin(tmp_path, uid=0, stale_lists=True)
    result = make_browser(bin_dir)
    assert result.returncode == 0, result.stderr
    install = "noninteractive -o DPkg::Lock::Timeout=300 install -y --no-install-recommends chromium"
    assert log.read_text().splitlines() == [install, "noninteractive update", install]  # stale lists: update, retry
    assert (bin_dir / "chromium").is_file()


@pytest.mark.skipif(MAKE is None, reason="make not installed")
def test_make_without_root_stops_and_says_how_and_with_chromium_does_nothing(tmp_path):
    bin_dir, log = fake_bin(tmp_path / "user", uid=1000)
    result = make_browser(bin_dir)
    assert result.returncode != 0 and "sudo apt-get install -y chromium" in result.stderr
    assert not log.exists()  # nothing was tried
    bin_dir, log = fake_bin(tmp_path / "installed", uid=0, chromium=True)
    assert make_browser(bin_dir).returncode == 0 and not log.exists()
