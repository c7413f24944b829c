"""Datasets and LightningDataModules; every batch is {"image", "caption", "attributes"} (docs/CONVENTIONS.md).

Sources: `shapes` (embedded, procedural), `digits` (scikit-learn), `laion_subset` (webdataset
shards), `imagefolder`. Names below are imported lazily so `import ldmkit.data` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "collate_samples": "collate",
    "ImageTextDataModule": "base",
    "SkippedSamplesLogger": "base",
    "SkipCounter": "skips",
    "ShapesDataModule": "shapes",
    "ShapesDataset": "shapes",
    "DigitsDataModule": "digits",
    "DigitsDataset": "digits",
    "WebDatasetDataModule": "webdataset",
    "LaionSubsetDataModule": "webdataset",
    "WebDatasetSamples": "webdataset",
    "ImageFolderDataModule": "imagefolder",
    "ImageFolderDataset": "imagefolder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldmkit.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldmkit.data' has no attribute {name!r}")
