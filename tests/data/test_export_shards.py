from __future__ import annotations

import json
import shlex
import tarfile

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from torch.utils.data import Dataset

from ldmkit.cli.export_shards import compose_data_config, main, parse_args
from ldmkit.data.export_shards import export_dataset
from ldmkit.data.shapes import ShapesDataset
from ldmkit.data.webdataset import WebDatasetDataModule


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


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _shapes_argv(out, *extra):
    return ["data=shapes", f"out={out}", "split=val", "data.resolution=16", "shard_size=4", "num_samples=12", *extra]


def test_overwrite_validates_first_and_never_deletes_foreign_files(tmp_path):
    out = tmp_path / "shards"
    main(_shapes_argv(out))
    before = _snapshot(out)
    assert sorted(before) == ["00000.tar", "00001.tar", "00002.tar", "export_shards.json"]
    for bad in ("shard_size=0", "num_samples=0", "image_format=gif", "overwrite=maybe", "split=holdout"):
        with pytest.raises(SystemExit, match=bad.split("=")[0]):
            main(_shapes_argv(out, bad, "overwrite=true") if bad != "overwrite=maybe" else _shapes_argv(out, bad))
        assert _snapshot(out) == before  # nothing deleted before the arguments were checked
    with pytest.raises(ValueError, match="only has|has only"):  # found while writing: out stays as it was
        main(_shapes_argv(out, "num_samples=5000", "overwrite=true"))
    assert _snapshot(out) == before
    (out / "backup.tar").write_bytes(b"the user's own file")
    with pytest.raises(SystemExit, match="did not write.*backup.tar"):
        main(_shapes_argv(out, "overwrite=true"))
    assert _snapshot(out) == {**before, "backup.tar": b"the user's own file"}
    (out / "backup.tar").unlink()
    assert [p.name for p in main(_shapes_argv(out, "overwrite=true", "shard_size=12"))] == ["00000.tar"]
    assert sorted(_snapshot(out)) == ["00000.tar", "export_shards.json"]  # the old export replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temporary sibling left behind


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for argv in (_shapes_argv(target), _shapes_argv(target, "overwrite=true"), _shapes_argv(target / "sub")):
        with pytest.raises(SystemExit, match="file"):
            main(argv)
    assert target.read_text() == "keep me"


class _FailsHalfway(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        if index == 6:
            raise OSError("disk went away")
        return ShapesDataset("val", 10, 16, seed=0)[index]


def test_interrupted_export_leaves_out_unchanged(tmp_path):
    out = tmp_path / "shards"
    export_dataset(ShapesDataset("val", 6, 16, seed=1), out, shard_size=3)
    before = _snapshot(out)
    with pytest.raises(OSError, match="disk went away"):
        export_dataset(_FailsHalfway(), out, shard_size=2, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def _train_overrides(printed: str) -> list[str]:
    line = next(line for line in printed.splitlines() if "python train.py" in line)
    return shlex.split(line.split("python train.py", 1)[1])


def test_printed_hint_is_a_valid_hydra_override_that_reads_the_shards(tmp_path, capsys):
    out = tmp_path / "my shards, 'v1'"  # a space, a comma and quotes: the hint must survive the shell and Hydra
    shards = main(_shapes_argv(out))
    overrides = _train_overrides(capsys.readouterr().out)
    assert overrides[0] == "data=laion_subset" and "{00000..00002}" in overrides[1]
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert parsed[1].value() == f"{out}/{{00000..00002}}.tar"
    cfg = compose_data_config([*overrides, "data.num_workers=0", "data.resolution=16"])
    dm = instantiate(cfg.data)
    urls = dm.shard_urls()
    assert urls["train"] + urls["val"] == [str(p) for p in shards]
    assert len(list(dm.dataset("val"))) == 4  # the held-out last shard, read back


def test_missing_data_hint_is_a_valid_hydra_override(tmp_path):
    folder = tmp_path / "laion subset"
    dm = WebDatasetDataModule(train_shards=str(folder / "{00000..00009}.tar"))
    with pytest.raises(FileNotFoundError) as error:
        dm.setup("fit")
    overrides = _train_overrides(str(error.value))
    cfg = compose_data_config(overrides)
    assert cfg.data.train_shards == f"{folder}/{{00000..00009}}.tar"
    export = next(line for line in str(error.value).splitlines() if "export_shards" in line)
    assert f"out={folder}" in shlex.split(export.split("`")[1])
