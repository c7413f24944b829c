from __future__ import annotations

import json
import tarfile

import pytest

from ldmkit.data.export_shards import main, parse_args
from ldmkit.data.shapes import ShapesDataset


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_cli_writes_img2dataset_layout(tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["data=shapes", f"out={out}", "split=val", "num_samples=25", "shard_size=10", "seed=3",
            "data.resolution=16", f"paths.data_dir={tmp_path}"]
    shards = main(argv)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert "data.train_shards=" in capsys.readouterr().out
    first, last = _members(shards[0]), _members(shards[2])
    assert len(first) == 30 and len(last) == 15
    assert {n.rsplit(".", 1)[1] for n in first} == {"png", "txt", "json"}
    expected = ShapesDataset("val", 1000, 16, seed=3).__getitems__(range(20, 25))
    meta = [json.loads(last[f"00002{i}.json"]) for i in range(5)]
    assert [m["caption"] for m in meta] == [s["caption"] for s in expected]
    assert [last[f"00002{i}.txt"].decode() for i in range(5)] == [s["caption"] for s in expected]
    assert [m["attributes"] for m in meta] == [s["attributes"] for s in expected]
    assert meta[0]["index"] == 20 and meta[0]["width"] == 16 and meta[0]["split"] == "val"
    with pytest.raises(SystemExit, match="overwrite=true"):
        main(argv)
    assert len(main([*argv, "overwrite=true", "num_samples=5"])) == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "export_shards.json"]


def test_cli_exports_digits_whole_split(tmp_path):
    shards = main(["data=digits", f"out={tmp_path}", "split=test", "shard_size=100", "data.resolution=8"])
    members = _members(shards[0])
    assert len(shards) == 2 and json.loads(members["0000000.json"])["attributes"]["digit"] in range(10)
    assert b"handwritten" in members["0000000.txt"] or b"by hand" in members["0000000.txt"]


def test_parse_args():
    options, overrides = parse_args(["out=x", "data=digits", "num_samples=12", "overwrite=true", "data.resolution=64"])
    assert options["out"] == "x" and options["num_samples"] == 12 and options["overwrite"] is True
    assert overrides == ["data=digits", "data.resolution=64"]
    with pytest.raises(SystemExit, match="out=DIR"):
        parse_args(["data=shapes"])
    with pytest.raises(SystemExit, match="split"):
        parse_args(["out=x", "split=holdout"])
