"""CLIP image features for CMMD: preprocessing as google-research cmmd (PIL centre crop + bicubic),
unit-norm embeddings, and CMMD over streamed batches equal to the reference formula on the
features of the whole set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from ldmkit.eval.distribution import cmmd
from ldmkit.eval.features.clip import CLIPImageFeatureExtractor
from ldmkit.eval.features.common import FeatureSet
from tests.artifacts import write_clip


@pytest.fixture(scope="module")
def clip_artifact(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "artifact")


def cmmd_reference_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """google-research cmmd io_util._center_crop_and_resize, then / 255."""
    from PIL import Image

    im = Image.fromarray(image)
    w, h = im.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
    return np.asarray(im).astype(np.float32) / 255.0


def test_clip_features_match_reference_preprocessing(clip_artifact):
    extractor = CLIPImageFeatureExtractor(clip_artifact)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 48, 64, 3), dtype=np.uint8)
    ours = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))
    ref_pixels = torch.from_numpy(np.stack([cmmd_reference_preprocess(im, extractor.size) for im in images]))
    ref_pixels = (ref_pixels.permute(0, 3, 1, 2) - torch.tensor(extractor.mean).view(1, 3, 1, 1)) / torch.tensor(
        extractor.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = extractor.net.encode_image(ref_pixels.float())
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (ours - ref).abs().max() < 2e-3  # PIL rounding of a few pixels
    assert extractor.identity["preprocessing"]["resize"].startswith("largest centred square")


def test_cmmd_streams_and_equals_reference_formula(clip_artifact):
    extractor = CLIPImageFeatureExtractor(clip_artifact)
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (10, 3, 32, 32), generator=gen, dtype=torch.uint8)
    fake = (real.float() * 0.5 + 60).to(torch.uint8)
    reference, generated = FeatureSet.of(extractor), FeatureSet.of(extractor)
    for chunk in real.split(4):
        reference.update(chunk)
    shard_a, shard_b = FeatureSet.of(extractor), FeatureSet.of(extractor)  # two "processes"
    shard_a.update(fake[:3]), shard_b.update(fake[3:])
    shard_a.merge(shard_b)
    x, y = extractor(real).double().numpy(), extractor(fake).double().numpy()
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / 200.0)  # noqa: E731  sigma = 10
    expected = 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert cmmd(reference, shard_a) == pytest.approx(expected, rel=1e-4)
    assert expected > 0
