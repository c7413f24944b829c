"""Feature-space metrics against outside references: torch-fidelity (precision/recall), prdc
(density/coverage), a direct SciPy computation (CMMD) and closed forms (Frechet distance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from ldmkit.eval.distribution import (cmmd, density_coverage, frechet_feature_distance, mmd_rbf,
                                      precision_recall)
from ldmkit.eval.features.common import FeatureMismatchError, FeatureSet, stack_images

IDENTITY = {"network": "test", "weights": "abc", "preprocessing": {"resize": "none"}}


def feature_set(features: np.ndarray, identity: dict | None = None, batch: int | None = None) -> FeatureSet:
    fs = FeatureSet(identity or IDENTITY)
    batch = batch or len(features)
    for start in range(0, len(features), batch):
        fs.update_features(features[start : start + batch], image_size=(32, 32))
    return fs


def gaussian_pair(n: int = 300, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), (rng.normal(size=(n + 37, d)) * 1.3 + 0.4).astype(np.float32)


def test_frechet_distance_closed_form_two_gaussians():
    # FD(N(m1, S1), N(m2, S2)) with diagonal S: |m1 - m2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    a = (m1 + rng.normal(size=(n, d)) * np.sqrt(s1)).astype(np.float32)
    b = (m2 + rng.normal(size=(n, d)) * np.sqrt(s2)).astype(np.float32)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    fd = frechet_feature_distance(feature_set(a, batch=7919), feature_set(b, batch=50_000))
    assert fd == pytest.approx(expected, abs=0.03)  # sampling error of the moments at n = 2e5


def test_frechet_distance_of_exact_moments_is_closed_form():
    # Samples whose empirical mean/cov are exactly (m, S): whitened then coloured.
    rng = np.random.default_rng(2)
    d, n = 3, 50
    def exact(mean, cov):
        z = rng.normal(size=(n, d))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)
        return z @ np.linalg.cholesky(cov).T + mean
    s1, s2 = np.diag([1.0, 2.0, 3.0]), np.diag([4.0, 1.0, 0.25])
    a, b = exact(np.zeros(d), s1), exact(np.ones(d), s2)
    expected = 3.0 + np.trace(s1 + s2) - 2 * np.sum(np.sqrt(np.diag(s1) * np.diag(s2)))
    fs_a, fs_b = FeatureSet(IDENTITY), FeatureSet(IDENTITY)
    fs_a.stats.update_features(a.astype(np.float64)), fs_b.stats.update_features(b.astype(np.float64))
    assert frechet_feature_distance(fs_a, fs_b) == pytest.approx(expected, rel=1e-5)


def test_cmmd_equals_direct_scipy_computation_and_streams():
    x, y = gaussian_pair(120, 16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True) * 0.9
    k = lambda a, b: np.exp(-cdist(a.astype(np.float64), b.astype(np.float64), "sqeuclidean") / (2 * 10.0**2))  # noqa: E731
    expected = 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    one_pass = cmmd(feature_set(x), feature_set(y))
    assert one_pass == pytest.approx(expected, rel=1e-9)
    # Streaming: batches of 7 and two "processes" merged give the same value.
    part1, part2 = feature_set(y[:50], batch=7), feature_set(y[50:], batch=11)
    part1.merge(part2)
    assert cmmd(feature_set(x, batch=13), part1) == pytest.approx(one_pass, rel=1e-12)
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-9)


def _torch_fidelity_prc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    from torch_fidelity.metric_prc import prc_features_to_metric

    return prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=k,
                                  prc_batch_size=10000, save_cpu_ram=False, verbose=False)


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_equal_torch_fidelity(k):
    real, fake = gaussian_pair(250, 12, seed=k)
    ours = precision_recall(feature_set(real), feature_set(fake, batch=64), k=k)
    ref = _torch_fidelity_prc(real, fake, k)
    # torch-fidelity averages in float32: equal counts mean agreement far below 1 / n
    assert ours["precision"] == pytest.approx(ref["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(ref["recall"], abs=1e-6)
    assert 0.05 < ours["precision"] < 0.99 and 0.05 < ours["recall"] < 0.99  # not a degenerate case


def test_density_coverage_and_pr_equal_prdc_package():
    from prdc import compute_prdc

    real, fake = gaussian_pair(240, 10, seed=3)
    ref = compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    ours = density_coverage(feature_set(real), feature_set(fake), k=5)
    assert ours["density"] == pytest.approx(ref["density"], abs=1e-12)
    assert ours["coverage"] == pytest.approx(ref["coverage"], abs=1e-12)
    pr = precision_recall(feature_set(real), feature_set(fake), k=5)  # prdc's "<" vs our "<=": no ties here
    assert (pr["precision"], pr["recall"]) == pytest.approx((ref["precision"], ref["recall"]), abs=1e-12)
    assert 0.1 < ours["coverage"] < 0.99 and ours["density"] > 0.05
    shard_a, shard_b = feature_set(fake[:100], batch=9), feature_set(fake[100:], batch=33)  # two "processes"
    shard_a.merge(shard_b)
    assert density_coverage(feature_set(real), shard_a, k=5) == ours
    assert frechet_feature_distance(feature_set(real), shard_a) == pytest.approx(
        frechet_feature_distance(feature_set(real), feature_set(fake)), rel=1e-10)


def test_knn_metrics_say_the_minimum_number_of_images():
    real, fake = gaussian_pair(50, 4)
    with pytest.raises(ValueError, match=r"at least 4 generated images, got 3"):
        precision_recall(feature_set(real), feature_set(fake[:3]), k=3)
    with pytest.raises(ValueError, match=r"k=5.*at least 6 reference images, got 5"):
        density_coverage(feature_set(real[:5]), feature_set(fake), k=5)


def test_frechet_distance_says_the_minimum_for_a_covariance():
    real, fake = gaussian_pair(50, 4)
    with pytest.raises(ValueError, match=r"FD needs at least 2 generated images, got 1"):
        frechet_feature_distance(feature_set(real), feature_set(fake[:1]))


def test_sets_from_other_weights_or_preprocessing_are_refused(tmp_path):
    real, fake = gaussian_pair(30, 4)
    other_weights = dict(IDENTITY, weights="def")
    with pytest.raises(FeatureMismatchError, match=r"weights: 'abc' vs 'def'"):
        cmmd(feature_set(real), feature_set(fake, other_weights))
    other_pre = dict(IDENTITY, preprocessing={"resize": "bilinear"})
    saved = feature_set(real, other_pre).save(tmp_path / "ref.safetensors")
    with pytest.raises(FeatureMismatchError, match=r"preprocessing"):
        precision_recall(FeatureSet.load(saved), feature_set(fake))
    with pytest.raises(FeatureMismatchError, match=r"preprocessing"):
        feature_set(fake).merge(FeatureSet.load(saved))


def test_feature_file_round_trips_identity_and_features(tmp_path):
    real, _ = gaussian_pair(30, 4)
    fs = feature_set(real, batch=8)
    path = fs.save(tmp_path / "sub" / "real.safetensors")
    loaded = FeatureSet.load(path)
    assert loaded.identity == IDENTITY and loaded.image_size == (32, 32)
    np.testing.assert_array_equal(loaded.features, real)
    np.testing.assert_allclose(loaded.stats.covariance, np.cov(real, rowvar=False, dtype=np.float64), rtol=1e-10)
    assert sorted(p.name for p in path.parent.iterdir()) == ["real.safetensors"]  # no temporary left behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        FeatureSet.load(tmp_path / "bad.safetensors")


def test_mixed_image_sizes_are_refused():
    with pytest.raises(ValueError, match=r"mixed sizes .*resize them to one size"):
        stack_images([torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(3, 64, 64, dtype=torch.uint8)])
    fs = FeatureSet(IDENTITY, extractor=lambda images: torch.zeros(len(images), 4))
    fs.update(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"holds 32x32 images, got a batch of 64x64"):
        fs.update(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    other = FeatureSet(IDENTITY)
    other.update_features(np.random.default_rng(0).normal(size=(8, 4)), image_size=(64, 64))
    fs.update_features(np.random.default_rng(1).normal(size=(8, 4)))
    with pytest.raises(FeatureMismatchError, match=r"32x32 images with one of 64x64"):
        frechet_feature_distance(fs, other)
