"""bench/sampling_throughput.py smoke run (no timing assertions). Its peer once patched a name that had moved
(`ldmkit.txt2img.classifier_free_guidance`, now bound in `ldmkit.generator`), and only the GPU check's first run
found it: this runs the bench's both arms and checks that the two-forward peer really ran and gave the same images."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow  # writes three tiny artifacts and samples 2 x 4 times: ~20 s
def test_both_arms_run_and_agree(capsys, monkeypatch):
    import sampling_throughput

    calls = []
    original = sampling_throughput.TwoPassGuidance.__call__
    monkeypatch.setattr(sampling_throughput.TwoPassGuidance, "__call__",
                        lambda self, x_t, t: calls.append(x_t.shape[0]) or original(self, x_t, t))
    sampling_throughput.main(["--samplers", "ddim", "--steps", "2", "--batch", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert calls and set(calls) == {2}  # the peer's guidance ran, on batch B (not 2B)
    row = next(line for line in out.splitlines() if line.startswith("| ddim"))
    assert float(re.findall(r"[0-9.]+e[-+][0-9]+", row)[-1]) < 1e-4  # max |image diff| between the two arms
    assert "batched-CFG speed-up" in out
