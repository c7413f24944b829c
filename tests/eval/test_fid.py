from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmkit.eval import inception
from ldmkit.eval.fid import FeatureStats
from ldmkit.eval.inception import (
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    InceptionFeatureExtractor,
    InceptionWeightsNotFoundError,
    resolve_inception_weights,
)
from ldmkit.eval.reference_stats import folder_feature_stats, reference_stats


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Point the torch hub cache at an empty folder and unset the env override."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv(inception.INCEPTION_WEIGHTS_ENV, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


@pytest.mark.slow  # ~15-25 s CPU: 38 Inception passes at 299x299 and two 2048-d eigendecompositions
def test_fid_kid_equal_torch_fidelity_on_png_folders(tmp_path, inception_weights, empty_hub, png_folder):
    import torch_fidelity

    generated = png_folder(tmp_path / "generated", count=10, size=32, seed=1, smooth=False)
    reference = png_folder(tmp_path / "reference", count=9, size=32, seed=2, smooth=True)
    # The default location (torch hub cache) is where our loader finds the weights.
    empty_hub.parent.mkdir(parents=True)
    empty_hub.symlink_to(inception_weights)
    extractor = InceptionFeatureExtractor()
    assert extractor.weights_path == empty_hub

    ours_gen = folder_feature_stats(generated, extractor, batch_size=8)
    ours_ref = folder_feature_stats(reference, extractor, batch_size=64)
    ours_fid = ours_gen.compute_fid(ours_ref)
    ours_kid = ours_gen.compute_kid(ours_ref, subsets=20, subset_size=8)

    truth = torch_fidelity.calculate_metrics(
        input1=str(generated), input2=str(reference), cuda=False, fid=True, kid=True,
        kid_subsets=20, kid_subset_size=8, feature_extractor_weights_path=str(inception_weights),
        save_cpu_ram=True, cache=False, verbose=False,
    )
    assert truth["frechet_inception_distance"] > 1.0  # the folders really differ
    assert ours_fid == pytest.approx(truth["frechet_inception_distance"], rel=1e-3)
    assert ours_kid[0] == pytest.approx(truth["kernel_inception_distance_mean"], rel=1e-3)
    assert ours_kid[1] == pytest.approx(truth["kernel_inception_distance_std"], rel=1e-3)


def test_missing_weights_error_names_file_locations_and_fix(tmp_path, empty_hub):
    with pytest.raises(InceptionWeightsNotFoundError) as info:
        InceptionFeatureExtractor(tmp_path / "nowhere.pth")
    message = str(info.value)
    for expected in (INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_URL, str(empty_hub),
                     str(tmp_path / "nowhere.pth"), "eval.inception_path=", inception.INCEPTION_WEIGHTS_ENV):
        assert expected in message
    assert isinstance(info.value, FileNotFoundError)


def test_weights_resolution_order(tmp_path, empty_hub, monkeypatch):
    explicit, env = tmp_path / "explicit.pth", tmp_path / "env.pth"
    explicit.write_bytes(b"x")
    env.write_bytes(b"x")
    monkeypatch.setenv(inception.INCEPTION_WEIGHTS_ENV, str(env))
    assert resolve_inception_weights(explicit) == explicit
    assert resolve_inception_weights(None) == env
    monkeypatch.delenv(inception.INCEPTION_WEIGHTS_ENV)
    with pytest.raises(InceptionWeightsNotFoundError):
        resolve_inception_weights(None)


def test_streaming_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    features = (rng.standard_normal((157, 24)) * 0.01 + 50.0).astype(np.float32)  # large mean, tiny spread
    stats, other = FeatureStats(), FeatureStats()
    for chunk in np.array_split(features[:100], [1, 7, 40]):
        stats.update_features(torch.from_numpy(chunk))
    other.update_features(features[100:])
    stats.merge(other)
    reference = features.astype(np.float64)
    assert stats.num_samples == 157
    np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(reference, rowvar=False), rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(stats.features, features)


def test_fid_kid_math_equal_torch_fidelity_functions():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    f1 = rng.gamma(2.0, 0.2, (300, 64)).astype(np.float32)
    f2 = (rng.gamma(2.0, 0.2, (250, 64)) * 1.1 + 0.02).astype(np.float32)
    s1, s2 = FeatureStats(), FeatureStats()
    for chunk in np.array_split(f1, 4):
        s1.update_features(chunk)
    s2.update_features(f2)

    stat1 = fid_features_to_statistics(torch.from_numpy(f1))
    stat2 = fid_features_to_statistics(torch.from_numpy(f2))
    truth_fid = fid_statistics_to_metric(stat1, stat2, verbose=False)["frechet_inception_distance"]
    assert s1.compute_fid(s2) == pytest.approx(truth_fid, rel=1e-6)
    # Fewer samples than dimensions: rank-deficient covariances, FID against itself stays ~0.
    few = FeatureStats()
    few.update_features(f1[:20])
    assert abs(few.compute_fid(few)) < 1e-6 * truth_fid

    truth_kid = kid_features_to_metric(
        torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=30, kid_subset_size=100, verbose=False
    )
    mean, std = s1.compute_kid(s2, subsets=30, subset_size=100)
    assert mean == pytest.approx(truth_kid["kernel_inception_distance_mean"], rel=1e-6)
    assert std == pytest.approx(truth_kid["kernel_inception_distance_std"], rel=1e-6)
    assert mean != pytest.approx(s1.compute_kid(s2, subsets=30, subset_size=100, seed=7)[0], rel=1e-6)
    with pytest.raises(ValueError, match="subset size 400"):
        s1.compute_kid(s2, subset_size=400)


class PooledColourExtractor:
    """Cheap stand-in for Inception: per-channel means of a 4x4 pooling, (B, 48)."""

    identity = "pooled-colour-v1"

    def __init__(self):
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1) / 255


def test_float_images_are_quantised_like_uint8():
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8)
    from_float, from_uint8 = FeatureStats(PooledColourExtractor()), FeatureStats(PooledColourExtractor())
    from_float.update(images)
    from_uint8.update(as_uint8)
    np.testing.assert_array_equal(from_float.features, from_uint8.features)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        from_float.update(images * 127.5 + 127.5)


def test_reference_stats_are_cached_and_keyed(tmp_path):
    extractor = PooledColourExtractor()
    batches = [{"image": torch.rand(4, 3, 16, 16) * 2 - 1, "caption": [""] * 4} for _ in range(3)]
    kwargs = dict(dataset="shapes", split="val", resolution=16)

    first = reference_stats(batches, extractor, tmp_path, **kwargs)
    assert extractor.calls == 3 and first.num_samples == 12
    assert len(list(tmp_path.glob("ref-shapes-val-16px-*.npz"))) == 1

    second = reference_stats(batches, extractor, tmp_path, **kwargs)
    assert extractor.calls == 3  # hit: no images were featurised
    np.testing.assert_array_equal(second.mean, first.mean)
    np.testing.assert_array_equal(second.covariance, first.covariance)
    np.testing.assert_array_equal(second.features, first.features)
    assert abs(second.compute_fid(first)) < 1e-6

    capped = reference_stats(batches, extractor, tmp_path, max_images=6, **kwargs)
    assert capped.num_samples == 6 and extractor.calls == 5
    reference_stats(batches, extractor, tmp_path, **{**kwargs, "resolution": 32})
    extractor.identity = "pooled-colour-v2"
    reference_stats(batches, extractor, tmp_path, **kwargs)
    assert len(list(tmp_path.glob("ref-*.npz"))) == 4


def test_inception_weights_are_read_safely_checked_and_safetensors_give_the_same_features(
    tmp_path, inception_weights, empty_hub, monkeypatch, recwarn
):
    """The state dict is read with weights_only=True (or safetensors) and handed to torch-fidelity's
    network, whose own loader (torch.load with weights_only=False) never runs; a file that is not the
    official one (SHA-256 6726825d...) warns that FID is not comparable to published numbers."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    from safetensors.torch import save_file

    hook = tf_inception.load_state_dict_from_url
    real_load = torch.load

    def guarded_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "a weights file was unpickled without weights_only=True"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded_load)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.warns(inception.UnofficialInceptionWeightsWarning, match="NOT comparable to published numbers"):
        from_pth = InceptionFeatureExtractor(inception_weights)
    assert from_pth.official is False and tf_inception.load_state_dict_from_url is hook  # hook restored

    state = torch.load(inception_weights, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inception.safetensors"))
    with pytest.warns(inception.UnofficialInceptionWeightsWarning):
        from_safetensors = InceptionFeatureExtractor(tmp_path / "inception.safetensors")
    assert torch.equal(from_pth(images), from_safetensors(images))

    # the official file's hash: no warning (pretend the test file is it)
    monkeypatch.setattr(inception, "INCEPTION_WEIGHTS_SHA256", from_pth.sha256)
    recwarn.clear()
    assert InceptionFeatureExtractor(inception_weights).official is True
    assert not [w for w in recwarn if issubclass(w.category, inception.UnofficialInceptionWeightsWarning)]


def test_inception_weights_with_other_keys_fail_clearly(tmp_path, empty_hub):
    from ldmkit.nn.weights_file import WeightsFileError

    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsFileError, match=r"not torch-fidelity's Inception-v3 weights file .*Missing key"):
        InceptionFeatureExtractor(tmp_path / "other.pth")
