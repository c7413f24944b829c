"""bench/transformer_train_step.py: argument parsing and a tiny CPU run (no timing assertions)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402


def test_parses_its_gpu_mode():
    args = common.load_bench("transformer_train_step").parse_args(
        ["--device", "cuda", "--arch", "mmdit", "--preset", "sd3_medium", "--compile"])
    assert (args.device, args.arch, args.preset, args.compile, args.dtypes) == (
        "cuda", ["mmdit"], "sd3_medium", True, ["fp32", "bf16"])


@pytest.mark.slow
def test_runs_tiny_on_cpu(capsys):
    argv = ["--batch", "2", "--context-len", "4", "--steps", "1", "--warmup", "0", "--threads", "1"]
    common.load_bench("transformer_train_step").main(argv)
    out = capsys.readouterr().out
    assert "parameters: ldmkit 3,958,084  diffusers 3,958,084" in out  # DiT tiny vs PixArt
    assert "parameters: ldmkit 3,513,604  diffusers 3,513,604" in out  # MMDiT tiny vs SD3
    deltas = [float(m) for m in re.findall(r"max \|ldmkit - diffusers\| = (\S+)", out)]
    assert len(deltas) == 2 and max(deltas) <= 1e-5  # fp32; not 0: adaLN's fused multiply-adds round once
    for arch in ("dit", "mmdit"):
        for dtype in ("fp32", "bf16"):
            assert f"{arch:5} {dtype:4}  samples/s" in out
