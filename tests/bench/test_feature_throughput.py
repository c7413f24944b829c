"""bench/feature_throughput.py smoke run: the ldmkit loops and the reference loops (dgm-eval, cmmd) give the
same features on the same PNGs (no timing assertions)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow  # imports transformers + open_clip and writes two networks: ~1 min on a loaded 2-core machine
def test_smoke_run_prints_ratios_and_features_agree(capsys):
    import feature_throughput

    feature_throughput.main(["--images", "4", "--size", "40", "--batch", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert out.count("throughput ratio (reference time / ldmkit time)") == 2
    diffs = [float(m) for m in re.findall(r"\| ([0-9.e-]+)\s+\|\n", out)]
    assert len(diffs) == 4 and max(diffs) < 5e-3  # PIL rounding only
