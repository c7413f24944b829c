"""What every feature-space metric shares: image preprocessing that matches the reference
implementations (PIL resizes), and `FeatureSet`, features that carry the identity of the network
and preprocessing that made them, so sets made differently are never compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldmkit.eval.fid import FeatureStats, to_uint8_images
from ldmkit.images import UNIT, from_uint8

FEATURE_FILE_FORMAT = "ldmkit-features/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureMismatchError(ValueError):
    """Two feature sets were made by different networks, weights or preprocessing."""


def file_digest(path: str | os.PathLike, chars: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


def resize_like_pil(images: Tensor, size: int, center_crop: bool = False) -> Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size), bicubic with antialiasing, as
    `PIL.Image.resize(..., BICUBIC)` (the reference loops resize PIL images). torchvision's uint8 CPU
    kernel is PIL's (a = -0.5, support widened when downscaling): equal to within 2 levels of 255.
    `center_crop` first crops the largest centred square (CMMD's `_center_crop_and_resize`)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    images = to_uint8_images(images).cpu()  # the float kernels use a = -0.75, unlike PIL: stay uint8
    if center_crop:
        h, w = images.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top : top + side, left : left + side]
    if tuple(images.shape[-2:]) == (size, size):
        return images.contiguous()
    return TF.resize(images.contiguous(), [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)


def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, as ToTensor + Normalize."""
    x = from_uint8(images_uint8, UNIT)  # (B, 3, H, W) in [0, 1]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def stack_images(images: Sequence[Tensor]) -> Tensor:
    """Stack (3, H, W) images into one batch; mixed sizes are an error that names them."""
    sizes = sorted({tuple(image.shape) for image in images})
    if len(sizes) > 1:
        raise ValueError(
            f"images of mixed sizes {sizes[:4]}{' ...' if len(sizes) > 4 else ''} cannot form one set: feature "
            "metrics compare sets at one resolution; resize them to one size first"
        )
    return torch.stack(list(images))


class FeatureSet:
    """Features (N, D) of one image set, with streaming mean/covariance (fid.FeatureStats), the
    `identity` of the extractor (network, weights digest, preprocessing, feature) and the source
    image size. `merge` folds in another process's set; `check_comparable` refuses to compare sets
    made differently."""

    def __init__(self, identity: dict[str, Any], extractor: Callable[[Tensor], Tensor] | None = None):
        self.identity = dict(identity)
        self.extractor = extractor
        self.stats = FeatureStats(keep_features=True)
        self.image_size: tuple[int, int] | None = None

    @classmethod
    def of(cls, extractor: Callable[[Tensor], Tensor]) -> FeatureSet:
        return cls(extractor.identity, extractor)  # type: ignore[attr-defined]

    @property
    def num_samples(self) -> int:
        return self.stats.num_samples

    @property
    def features(self) -> np.ndarray:
        return self.stats.features  # (N, D) float32

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Extract and add features of a batch (B, 3, H, W), uint8 or floats in [-1, 1]."""
        if self.extractor is None:
            raise ValueError("this FeatureSet has no extractor (it was loaded from a file); use update_features")
        self._check_size(tuple(images.shape[-2:]))
        self.stats.update_features(self.extractor(images))

    def update_features(self, features: Tensor | np.ndarray, image_size: tuple[int, int] | None = None) -> None:
        if image_size is not None:
            self._check_size(tuple(image_size))
        self.stats.update_features(features)

    def merge(self, other: FeatureSet) -> None:
        check_comparable(self, other, "merge")
        if other.image_size is not None:
            self._check_size(other.image_size)
        self.stats.merge(other.stats)

    def _check_size(self, size: tuple[int, int]) -> None:
        if self.image_size is None:
            self.image_size = (int(size[0]), int(size[1]))
        elif tuple(size) != self.image_size:
            raise ValueError(
                f"this feature set holds {self.image_size[0]}x{self.image_size[1]} images, got a batch of "
                f"{size[0]}x{size[1]}: one set is one resolution; resize the images to one size first"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic safetensors write: the features plus identity and image size as metadata."""
        from safetensors.numpy import save_file

        if self.num_samples == 0:
            raise ValueError("refusing to save an empty feature set")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FEATURE_FILE_FORMAT, "identity": json.dumps(self.identity, sort_keys=True),
                    "image_size": json.dumps(self.image_size)}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"features": np.ascontiguousarray(self.features)}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FEATURE_FILE_FORMAT:
                raise ValueError(f"{path} is not an ldmkit feature file (format {metadata.get('format')!r}, "
                                 f"expected {FEATURE_FILE_FORMAT!r}); write it with FeatureSet.save")
            features = f.get_tensor("features")
        feature_set = cls(json.loads(metadata["identity"]))
        size = json.loads(metadata.get("image_size", "null"))
        feature_set.update_features(features, tuple(size) if size else None)
        return feature_set


def check_comparable(a: FeatureSet, b: FeatureSet, what: str = "compare") -> None:
    """Raise FeatureMismatchError unless both sets come from the same extractor, weights,
    preprocessing and source resolution."""
    keys = sorted(set(a.identity) | set(b.identity))
    diffs = [f"{key}: {a.identity.get(key)!r} vs {b.identity.get(key)!r}"
             for key in keys if a.identity.get(key) != b.identity.get(key)]
    if diffs:
        raise FeatureMismatchError(
            f"cannot {what} feature sets made differently ({'; '.join(diffs)}); recompute one of them with the "
            "same network, weights and preprocessing (features from other weights are not comparable)"
        )
    if a.image_size is not None and b.image_size is not None and a.image_size != b.image_size:
        raise FeatureMismatchError(
            f"cannot {what} a set of {a.image_size[0]}x{a.image_size[1]} images with one of "
            f"{b.image_size[0]}x{b.image_size[1]} images: resize the reference images to the generated resolution"
        )
