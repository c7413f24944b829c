from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the real `conf/train.yaml` with overrides, paths redirected into tmp_path."""
    from ldmkit.config import compose

    def _compose(overrides: list[str] = (), config_name: str = "train"):
        return compose(overrides, config_name, config_dir=CONF_DIR, set_hydra_config=True, workdir=tmp_path, root_dir=ROOT)

    yield _compose


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """{"autoencoder", "clip", "ldm"} artifact folders of tiny random models (see tests/artifacts.py)."""
    from tests.artifacts import write_autoencoder, write_clip, write_ldm

    root = tmp_path_factory.mktemp("artifacts")
    ae = write_autoencoder(root / "autoencoder")
    clip = write_clip(root / "clip")
    ldm = write_ldm(root / "ldm", ae, clip)
    return {"autoencoder": ae, "clip": clip, "ldm": ldm}
