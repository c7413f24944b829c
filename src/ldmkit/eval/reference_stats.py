"""Feature statistics of real images: every image of a folder, and reference statistics of a dataset
split computed once and then read from a cache keyed on everything that changes them."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldmkit.eval.fid import FeatureStats

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # torch-fidelity's `samples_find_ext` default


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Images directly in `folder` (not recursive), sorted by real path like torch-fidelity,
    so KID subsets pick the same images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist")
    files = [
        Path(os.path.realpath(p))
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    return sorted(files, key=str)


def read_image_uint8(path: str | os.PathLike) -> Tensor:
    """(3, H, W) uint8, RGB."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def folder_feature_stats(
    folder: str | os.PathLike,
    extractor: Callable[[Tensor], Tensor],
    batch_size: int = 64,
    keep_features: bool = True,
) -> FeatureStats:
    """FeatureStats of every png/jpg/jpeg directly in `folder`."""
    files = list_image_files(folder)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}")
    stats = FeatureStats(extractor, keep_features=keep_features)
    for start in range(0, len(files), batch_size):
        images = [read_image_uint8(p) for p in files[start : start + batch_size]]
        if len({tuple(im.shape) for im in images}) == 1:
            stats.update(torch.stack(images))
        else:  # mixed sizes cannot be stacked; Inception resizes each to 299 anyway
            for image in images:
                stats.update(image[None])
    return stats


def reference_stats_key(dataset: str, split: str, resolution: int, extractor_id: str, **extra: Any) -> str:
    """Stable hash of everything that changes reference statistics."""
    fields = {"dataset": dataset, "split": split, "resolution": resolution, "extractor": extractor_id, **extra}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_stats(
    batches: Iterable[Tensor | dict[str, Any]],
    extractor: Callable[[Tensor], Tensor],
    cache_dir: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    resolution: int,
    max_images: int | None = None,
) -> FeatureStats:
    """Reference FeatureStats for (dataset, split, resolution, extractor), computed once and then
    read from `cache_dir`. `batches` (e.g. a datamodule's dataloader; dicts use their "image"
    entry) is only iterated on a cache miss. The extractor's `identity` attribute, when present,
    is part of the key (InceptionFeatureExtractor hashes its weights file)."""
    extractor_id = getattr(extractor, "identity", type(extractor).__qualname__)
    key = reference_stats_key(dataset, split, resolution, extractor_id, max_images=max_images)
    path = Path(cache_dir) / f"ref-{_slug(dataset)}-{_slug(split)}-{resolution}px-{key}.npz"
    if path.is_file():
        return FeatureStats.load(path)
    stats = FeatureStats(extractor)
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch
        if max_images is not None:
            images = images[: max_images - stats.num_samples]
        if len(images):
            stats.update(images)
        if max_images is not None and stats.num_samples >= max_images:
            break
    metadata = {"dataset": dataset, "split": split, "resolution": resolution, "extractor": extractor_id,
                "max_images": max_images, "num_samples": stats.num_samples}
    stats.save(path, metadata)
    return stats


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:40]
