"""Issue 18's bad input for the report and the feature metrics: a cached feature file made with other
weights or preprocessing, from another number of images, or unreadable, is refused before any sample is
drawn; fewer images than CMMD needs says the minimum; a run that fails leaves no report behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.eval.distribution import cmmd
from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.features.common import FeatureSet
from ldmkit.eval.metrics.base import EvalContext
from ldmkit.eval.metrics.feature_reference import FeatureReference
from tests.eval.test_eval_cli import TINY, run_eval

IDENTITY = {"network": "mean colour", "weights": "none", "preprocessing": {"resize": "none"}}


class MeanColour:
    """A stand-in extractor: the mean colour of each image (B, 3)."""

    identity = IDENTITY

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))


class RealImages:
    name, resolution = "noise", 8

    def dataloader(self, split: str):
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            yield {"image": torch.randint(0, 256, (2, 3, 8, 8), generator=gen, dtype=torch.uint8)}


def context(tmp_path: Path, num_samples: int = 4) -> EvalContext:
    return EvalContext(ldm_config={}, datamodule=RealImages(), split="test", file_prompts=None,
                       num_samples=num_samples, height=8, width=8, cache_dir=tmp_path, data_identity="noise")


def test_cached_features_made_differently_are_refused_before_sampling(tmp_path):
    built = FeatureReference.build(MeanColour(), context(tmp_path))
    assert built.real.num_samples == 4 and built.cache_file.is_file()
    again = FeatureReference.build(MeanColour(), context(tmp_path))  # read back from the cache
    np.testing.assert_array_equal(again.real.features, built.real.features)

    path = built.cache_file
    other = FeatureSet({**IDENTITY, "preprocessing": {"resize": "bilinear 224"}})  # e.g. a copied cache folder
    other.update_features(np.zeros((4, 3), np.float32), (8, 8))
    path.unlink()
    other.save(path)
    with pytest.raises(EvalConfigError, match=r"made differently from this run's: .*preprocessing: \{'resize': "
                                              r"'bilinear 224'\} vs \{'resize': 'none'\}.*delete that file"):
        FeatureReference.build(MeanColour(), context(tmp_path))

    fewer = FeatureSet(IDENTITY)
    fewer.update_features(np.zeros((3, 3), np.float32), (8, 8))
    path.unlink()
    fewer.save(path)
    with pytest.raises(EvalConfigError, match=r"hold 3 images, this run compares 4; delete that file"):
        FeatureReference.build(MeanColour(), context(tmp_path))

    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(EvalConfigError, match=r"cannot be read \(.*\); delete that file"):
        FeatureReference.build(MeanColour(), context(tmp_path))
    assert path.read_bytes()  # the file is the user's to delete: kept


def test_cmmd_says_the_minimum_number_of_images():
    one, two = FeatureSet(IDENTITY), FeatureSet(IDENTITY)
    one.update_features(np.ones((1, 3), np.float32))
    two.update_features(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"CMMD needs at least 2 generated images, got 1"):
        cmmd(two, one)


def test_a_failed_run_leaves_no_report(tiny_artifacts, tmp_path, monkeypatch):
    def fail(self, partials):
        raise RuntimeError("the judge broke")

    monkeypatch.setattr("ldmkit.eval.metrics.clip_score.CLIPScoreMetric.merge", fail)
    overrides = [f"ckpt={tiny_artifacts['ldm']}", "samplers=[ddim]", "steps=[2]", "guidance=[3]", "num_samples=2",
                 "batch_size=2", "metrics=[clip_score]", *TINY[:3]]
    with pytest.raises(RuntimeError, match="the judge broke"):
        run_eval(overrides, tmp_path)
    run = tmp_path / "run"
    assert run.is_dir() and not list(run.glob("report*")) and not list(run.glob("metrics*"))
