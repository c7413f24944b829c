"""bench/convert_memory.py smoke run on a tiny SD model: every step runs in its own process and reports its peak RSS,
the ratio to the model's size and its time, next to a peer (no timing or memory assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("diffusers")


@pytest.mark.slow  # 4 fresh processes that import torch, diffusers or open_clip: ~1-2 min on the loaded 2-core machine
def test_smoke_run_reports_peak_rss_ratio_and_time(tmp_path, capsys) -> None:
    import convert_memory

    steps = ["baseline", "import folder", "export single file", "safetensors load_file + clone"]
    result = convert_memory.main(["--size", "tiny", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json"),
                                  "--steps", *steps])
    out = capsys.readouterr().out
    assert [r["step"] for r in result["rows"]] == steps
    assert result["model_bytes"] == result["stored_bytes"] > 0 and result["disk_bytes"] >= result["model_bytes"]
    for row in result["rows"]:
        assert row["peak_rss_bytes"] > 0 and row["seconds"] > 0
        assert row["ratio"] == pytest.approx(row["peak_rss_bytes"] / result["model_bytes"])
        assert f"| {row['step']}" in out
    assert "import folder: peak RSS / model size = " in out and "export single file: peak RSS / model size = " in out
    assert "peak RSS ratio ldmkit / (safetensors load_file + clone): import folder " in out
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == result["rows"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the model files are deleted without --keep
