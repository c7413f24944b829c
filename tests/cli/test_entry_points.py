"""Every `python -m ldmkit.cli.NAME` the docs name exists and answers --help (run in-process with runpy)."""

from __future__ import annotations

import runpy
import sys

import pytest
import yaml


@pytest.mark.parametrize("name, expected", [
    ("convert", "python -m ldmkit.cli.convert import SRC out=DIR"),
    ("export_shards", "python -m ldmkit.data.export_shards data=shapes out=DIR"),
    ("latent_cache", "python -m ldmkit.data.latent_cache data=shapes"),
    ("judge", "--cache-dir"),
    ("quickstart", "--sequential"),
])
def test_cli_help(monkeypatch, capsys, name, expected):
    monkeypatch.setattr(sys, "argv", [f"ldmkit.cli.{name}", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"ldmkit.cli.{name}", run_name="__main__")
    assert exit_info.value.code in (0, None)
    assert expected in capsys.readouterr().out


def test_train_and_eval_shells_share_the_sweep_value():
    from ldmkit.cli.entry import optimized_value

    assert optimized_value({"optimized_metric": "val/loss"}, {"val/loss": 0.5, "val/fid": 9.0}) == 0.5
    assert optimized_value({"optimized_metric": None}, {"val/loss": 0.5}) is None
    assert optimized_value({}, {"val/loss": 0.5}) is None


def test_installed_train_entry_point_takes_the_old_schedule_overrides_as_train_py_does(monkeypatch, capsys):
    """`python -m ldmkit.cli.train schedule.KEY=V` composes `process.KEY=V`, like `python train.py` (test_configs)."""
    monkeypatch.setattr(sys, "argv", ["ldmkit.cli.train", "model=ldm", "schedule.zero_terminal_snr=true", "--cfg", "job"])
    runpy.run_module("ldmkit.cli.train", run_name="__main__")
    composed = yaml.safe_load(capsys.readouterr().out)  # --cfg job: the composed config, not run
    assert composed["process"]["zero_terminal_snr"] is True and "schedule" not in composed
