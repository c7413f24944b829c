"""bench/unet_train_step.py: argument parsing and a tiny CPU run (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402


def test_benchmark_parses_its_gpu_mode():
    args = common.load_bench("unet_train_step").parse_args(
        ["--device", "cuda", "--preset", "sd15", "--latent-size", "64", "--compile"])
    assert (args.device, args.preset, args.compile, args.dtypes) == ("cuda", "sd15", True, ["fp32", "bf16"])


@pytest.mark.slow
def test_benchmark_runs_on_cpu(capsys):
    argv = ["--batch", "2", "--context-len", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]
    common.load_bench("unet_train_step").main(argv)
    out = capsys.readouterr().out
    assert "parameters: ldmkit 6,105,348  diffusers 6,105,348" in out
    assert "fp32  samples/s" in out and "bf16  samples/s" in out
