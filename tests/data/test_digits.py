from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ldmkit.data.digits import DIGIT_WORDS, DigitsDataModule, DigitsDataset, digit_caption


def test_splits_are_disjoint_complete_stratified_and_seed_independent():
    datasets = {s: DigitsDataset(s, 16, seed=0) for s in ("train", "val", "test")}
    indices = {s: set(d.indices.tolist()) for s, d in datasets.items()}
    assert sum(len(v) for v in indices.values()) == 1797 == len(set.union(*indices.values()))
    assert 170 < len(indices["val"]) < 190 and 170 < len(indices["test"]) < 190
    assert set(datasets["val"].targets.tolist()) == set(range(10))
    assert indices["test"] == set(DigitsDataset("test", 16, seed=123).indices.tolist())  # seed moves no image
    assert indices["test"] != set(DigitsDataset("test", 16, split_seed=1).indices.tolist())


def test_samples_images_captions_and_attributes():
    dataset = DigitsDataset("val", 32, seed=0)
    sample = dataset[5]
    digit = sample["attributes"]["digit"]
    assert sample["attributes"] == {"digit": int(dataset.targets[5])}
    assert DIGIT_WORDS[digit] in sample["caption"] or str(digit) in sample["caption"]
    assert "handwritten" in sample["caption"] or "by hand" in sample["caption"]
    image = sample["image"]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])
    assert image.min() == -1.0 and image.max() > 0.5  # white ink on black
    assert DigitsDataset("val", 32, seed=0)[5]["caption"] == sample["caption"]  # deterministic wording
    assert len({dataset[i]["caption"].replace(DIGIT_WORDS[dataset[i]["attributes"]["digit"]], "#")
                for i in range(60)}) > 3


def test_digit_caption():
    assert digit_caption(7) == "a handwritten digit seven"
    assert {digit_caption(3, random.Random(i)) for i in range(100)} >= {"a handwritten digit three", "handwritten digit 3"}


def test_images_are_the_sklearn_digits_upscaled():
    from sklearn.datasets import load_digits

    dataset = DigitsDataset("train", 8, seed=0)
    original = load_digits().images[dataset.indices[0]] / 16.0
    np.testing.assert_allclose((dataset[0]["image"][0].numpy() + 1) / 2, original, atol=0.02)


def test_datamodule_loader_and_validation():
    dm = DigitsDataModule(batch_size=16, num_workers=0, resolution=32, seed=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and len(batch["attributes"]) == 16
    with pytest.raises(ValueError, match="resolution"):
        DigitsDataModule(resolution=4)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)
