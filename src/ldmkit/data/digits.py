"""`digits`: the 1,797 real 8x8 handwritten digits shipped with scikit-learn, upscaled and captioned.

White ink on black, bicubic-upscaled to the resolution. The split is stratified per digit and
fixed by `split_seed` (not the training seed), so changing `seed` never moves test images into
training. Caption wording is a pure function of (seed, split, index).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.shapes import sample_keys
from ldmkit.images import UNIT, from_uint8, to_uint8

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten {word}",
    "the number {word}, handwritten",
    "handwritten digit {digit}",
    "the digit {digit} written by hand",
    "a {word} written by hand",
)


def digit_caption(digit: int, rng: random.Random | None = None) -> str:
    """"a handwritten digit seven" (rng=None), or a random template when an rng is given."""
    template = _TEMPLATES[0] if rng is None else rng.choice(_TEMPLATES)
    return template.format(word=DIGIT_WORDS[digit], digit=digit)


def split_indices(targets: np.ndarray, split: str, fractions: tuple[float, float], split_seed: int = 0) -> np.ndarray:
    """Indices of `split`: per digit, a seeded permutation cut into train / val / test parts."""
    val_fraction, test_fraction = fractions
    rng = np.random.default_rng(split_seed)
    chosen = []
    for digit in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == digit))
        n_val, n_test = round(len(members) * val_fraction), round(len(members) * test_fraction)
        parts = {"val": members[:n_val], "test": members[n_val : n_val + n_test], "train": members[n_val + n_test :]}
        chosen.append(parts[split])
    return np.sort(np.concatenate(chosen))


def upscale_digits(images: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> (N, R, R) uint8, bicubic (clamped against overshoot)."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return to_uint8(x.squeeze(1), UNIT)


class DigitsDataset(Dataset):
    """One split of scikit-learn's digits at `resolution` (kept as uint8 greyscale, RGB on access)."""

    def __init__(
        self,
        split: str = "train",
        resolution: int = 32,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        hflip: bool = False,
    ) -> None:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        digits = load_digits()
        self.indices = split_indices(digits.target, split, (val_fraction, test_fraction), split_seed)
        self.targets = digits.target[self.indices].astype(np.int64)
        self.images = upscale_digits(digits.images[self.indices], resolution)  # (N, R, R) uint8
        self.split, self.seed, self.hflip = split, int(seed), hflip
        self._caption_keys = sample_keys(self.seed, split, np.arange(len(self.indices))).tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        grey = from_uint8(self.images[index])
        image = grey.unsqueeze(0).expand(3, -1, -1).clone()  # (3, R, R)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        digit = int(self.targets[index])
        caption = digit_caption(digit, random.Random(self._caption_keys[index]))
        return {"image": image, "caption": caption, "attributes": {"digit": digit}}


class DigitsDataModule(ImageTextDataModule):
    """Real handwritten digits (sklearn `load_digits`), captioned "a handwritten digit seven"."""

    name = "digits"
    min_resolution = 8

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        **loader_options: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, resolution, seed, **loader_options)
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"digits: need 0 <= val_fraction, test_fraction and val+test < 1, got {val_fraction}, {test_fraction}"
            )
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    def make_dataset(self, split: str, augment: bool = False) -> DigitsDataset:
        return DigitsDataset(
            split, self.resolution, self.seed, self.val_fraction, self.test_fraction, self.split_seed, hflip=augment
        )

    @staticmethod
    def zero_shot_task(template: str = "a handwritten digit {digit}") -> Any:
        """CLIP validation's zero-shot classification: ten prompts, one per digit word, as the captions say."""
        from ldmkit.nn.clip import ZeroShotTask

        def target(attributes: dict) -> dict | None:
            digit = attributes.get("digit")
            return None if digit is None else {"digit": DIGIT_WORDS[int(digit)]}

        return ZeroShotTask("digits", template, {"digit": list(DIGIT_WORDS)}, target)
