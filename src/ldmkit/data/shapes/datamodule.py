"""`ShapesDataset` (a map-style view of the generator, rendered a batch at a time) and `ShapesDataModule`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.images import validate_resolution
from ldmkit.data.shapes.captions import _caption_for_training, mirror_sample
from ldmkit.data.shapes.render import render_attributes, render_scenes
from ldmkit.data.shapes.scenes import (
    _POSITION_XY, COLOUR_RGB, COLOURS, MIN_RESOLUTION, POSITIONS, SHAPES, SIZES, sample_keys, sample_scenes,
)
from ldmkit.data.shapes.suite import CATEGORIES, CHECKED, SUITE_FRAME, counterpart, scene_for, suite_prompts



def _check_probabilities(two_object_prob: float, same_pair_prob: float) -> None:
    for name, value in (("two_object_prob", two_object_prob), ("same_pair_prob", same_pair_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"shapes: {name} must be in [0, 1], got {value}")


class ShapesDataset(Dataset):
    """Map-style view of the generator: `size` virtual samples of one split, rendered on demand."""

    def __init__(
        self,
        split: str = "train",
        size: int = 50_000,
        resolution: int = 32,
        seed: int = 0,
        two_object_prob: float = 0.3,
        omit_prob: float = 0.15,
        background_prob: float = 0.25,
        supersample: int | None = None,
        hflip: bool = False,
        same_pair_prob: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1:
            raise ValueError(f"shapes: {split} size must be >= 1, got {size}")
        _check_probabilities(two_object_prob, same_pair_prob)
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.resolution = validate_resolution(resolution, MIN_RESOLUTION, "shapes")
        self.two_object_prob, self.omit_prob, self.background_prob = two_object_prob, omit_prob, background_prob
        self.supersample = supersample
        self.hflip = hflip
        self.same_pair_prob = same_pair_prob

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> dict:
        """Attributes of sample `index` without rendering it."""
        keys = sample_keys(self.seed, self.split, [index])
        return sample_scenes(keys, self.two_object_prob, self.same_pair_prob)[1][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Render a whole batch at once (DataLoader calls this with the batch's indices)."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not -self.size <= i < self.size:
                raise IndexError(f"index {i} out of range for shapes {self.split} split of size {self.size}")
        indices = [i % self.size for i in indices]
        keys = sample_keys(self.seed, self.split, indices)
        scene, attributes = sample_scenes(keys, self.two_object_prob, self.same_pair_prob)
        images = render_scenes(scene, self.resolution, self.supersample)
        samples = []
        for image, attrs, key in zip(images, attributes, keys.tolist()):
            rng = random.Random(key)  # caption wording: also a pure function of (seed, split, index)
            caption = _caption_for_training(attrs, rng, self.omit_prob, self.background_prob)
            sample = {"image": image, "caption": caption, "attributes": attrs}
            if self.hflip and torch.rand(()) < 0.5:
                sample = mirror_sample(sample)
            samples.append(sample)
        return samples


class ShapesDataModule(ImageTextDataModule):
    """Embedded captioned-shapes data: nothing to download, generated on the fly.

    `hflip` (train only, off by default) mirrors the image *and* swaps left/right in the caption
    and attributes, since captions name positions.
    """

    name = "shapes"
    min_resolution = MIN_RESOLUTION

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        train_size: int = 50_000,
        val_size: int = 1000,
        test_size: int = 1000,
        two_object_prob: float = 0.3,
        omit_prob: float = 0.15,
        background_prob: float = 0.25,
        supersample: int | None = None,
        same_pair_prob: float = 0.0,
        **loader_options: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, resolution, seed, **loader_options)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        for split, n in self.sizes.items():
            if n < 1:
                raise ValueError(f"shapes: {split}_size must be >= 1, got {n}")
        _check_probabilities(two_object_prob, same_pair_prob)
        self.two_object_prob, self.omit_prob, self.background_prob = two_object_prob, omit_prob, background_prob
        self.supersample = supersample
        self.same_pair_prob = same_pair_prob

    def make_dataset(self, split: str, augment: bool = False) -> ShapesDataset:
        return ShapesDataset(
            split, self.sizes[split], self.resolution, self.seed, self.two_object_prob,
            self.omit_prob, self.background_prob, self.supersample, hflip=augment, same_pair_prob=self.same_pair_prob,
        )

    # --- hooks read by evaluation code, so that it needs no knowledge of this dataset

    @staticmethod
    def zero_shot_task(template: str = "a {colour} {shape}") -> Any:
        """CLIP validation's zero-shot classification: colour x shape prompts, scored on single-object images."""
        from ldmkit.nn.clip import ZeroShotTask

        def target(attributes: dict) -> dict | None:
            objects = attributes.get("objects") or []
            return {"colour": objects[0]["colour"], "shape": objects[0]["shape"]} if len(objects) == 1 else None

        return ZeroShotTask("shapes", template, {"colour": list(COLOURS), "shape": list(SHAPES)}, target)

    @staticmethod
    def attribute_task() -> dict[str, Any]:
        """What an attribute judge (ldmkit.eval.attributes) learns and reads back on this data: its fields and
        their values, a single-object training set, which held-out prompts it can judge (one object), and the
        palette and position anchors the object finder (ldmkit.eval.objects) measures with."""

        def training_set(resolution: int, size: int, seed: int) -> ShapesDataset:
            return ShapesDataset("train", size=size, resolution=resolution, seed=seed, two_object_prob=0.0)

        return {
            "name": "shapes",
            "fields": {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS},
            "judged_fields": ("colour", "shape"),
            "judges": lambda attributes: bool(attributes) and len(attributes.get("objects", [])) == 1,
            "judged_prompts": "single-object",
            "unjudged_prompts": "two-object prompts are not judged",
            "training_set": training_set,
            "palette": COLOUR_RGB,  # what the object finder (ldmkit.eval.objects) segments and names colours by
            "anchors": _POSITION_XY,  # position name -> (x, y) centre, as fractions of the width
        }

    @staticmethod
    def compositional_suite() -> dict[str, Any]:
        """The compositional prompt suite (ldmkit.data.shapes.suite) and how to draw real images for and against
        each of its prompts (the object judge's own accuracy, `ldmkit.eval.compositional`)."""
        return {
            "name": "shapes",
            "categories": CATEGORIES,
            "checked": CHECKED,
            "frame": SUITE_FRAME,
            "prompts": suite_prompts,
            "scene_for": scene_for,
            "counterpart": counterpart,
            "render": render_attributes,
        }
