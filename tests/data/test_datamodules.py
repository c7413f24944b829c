from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

from ldmkit.data.base import ImageTextDataModule
from ldmkit.data.collate import collate_samples
from ldmkit.cli.export_shards import compose_data_config
from ldmkit.data.shapes import ShapesDataModule
from ldmkit.data.webdataset import WebDatasetDataModule

CONF = Path(__file__).resolve().parents[2] / "conf"
DATA_OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def _compose(tmp_path, overrides):
    cfg = compose_data_config([*overrides, f"paths.data_dir={tmp_path}/data"], CONF)
    return cfg


def test_all_four_sources_have_configs():
    assert {"shapes", "digits", "laion_subset", "imagefolder"} <= set(DATA_OPTIONS)


@pytest.mark.parametrize("name", DATA_OPTIONS)
def test_configs_instantiate_fast_without_touching_data(tmp_path, name):
    cfg = _compose(tmp_path, [f"data={name}", "seed=7"])
    start = time.perf_counter()
    dm = instantiate(cfg.data)
    assert time.perf_counter() - start < 1.0
    assert isinstance(dm, ImageTextDataModule) and not dm._datasets
    assert dm.seed == 7 and dm.resolution == 32 and dm.num_workers == 2 and dm.batch_size > 0
    assert dm.hparams["resolution"] == 32


def test_resolution_override_and_validation(tmp_path):
    assert instantiate(_compose(tmp_path, ["data=shapes", "data.resolution=64"]).data).resolution == 64
    with pytest.raises(Exception, match="resolution"):
        instantiate(_compose(tmp_path, ["data=shapes", "data.resolution=12"]).data)


def test_laion_subset_default_path_error_in_setup(tmp_path):
    dm = instantiate(_compose(tmp_path, ["data=laion_subset"]).data)
    assert dm.patterns["train"] == f"{tmp_path}/data/laion_subset/{{00000..00009}}.tar"
    with pytest.raises(FileNotFoundError, match="img2dataset"):
        dm.setup("fit")


def test_imagefolder_missing_root_error_in_setup(tmp_path):
    dm = instantiate(_compose(tmp_path, ["data=imagefolder"]).data)
    with pytest.raises(FileNotFoundError, match="data=shapes"):
        dm.setup("fit")


def test_loader_settings():
    shapes = ShapesDataModule(batch_size=4, num_workers=0, train_size=8, val_size=8)
    train, val = shapes.train_dataloader(), shapes.val_dataloader()
    assert train.collate_fn is collate_samples and train.drop_last and not val.drop_last
    assert not train.persistent_workers and not train.pin_memory
    with_workers = ShapesDataModule(num_workers=2, pin_memory=True).val_dataloader()
    assert with_workers.persistent_workers and with_workers.pin_memory


def test_argument_validation():
    for bad in ({"batch_size": 0}, {"num_workers": -1}, {"batch_size": 2.5}):
        with pytest.raises(ValueError):
            ShapesDataModule(**bad)
    with pytest.raises(ValueError, match="two_object_prob"):
        ShapesDataModule(two_object_prob=1.5)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        WebDatasetDataModule(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="unknown stage"):
        ShapesDataModule().setup("training")
