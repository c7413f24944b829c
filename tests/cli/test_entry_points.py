"""Every `python -m ldmkit.cli.NAME` the docs name exists and answers --help (run in-process with runpy)."""

from __future__ import annotations

import runpy
import sys

import pytest


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
