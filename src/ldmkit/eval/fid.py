"""FID and KID with streaming feature statistics (`FeatureStats`), on any extractor's features.

The metric math follows `torch_fidelity/metric_fid.py` and `metric_kid.py` (v0.4.0) line by line, so
numbers are comparable to `torch_fidelity.calculate_metrics` on the same images (tests check this).
The Inception-v3 network is in `ldmkit.eval.inception`; image folders and cached reference statistics in
`ldmkit.eval.reference_stats`.

FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...", eq. (6).
KID: Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3 (unbiased MMD^2, cubic kernel).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldmkit.images import to_uint8

# torch-fidelity defaults (torch_fidelity/defaults.py)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


def to_uint8_images(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 passes through; floats in [-1, 1] are quantised like a saved PNG."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 images or floats in [-1, 1], got dtype {images.dtype}")
    if images.numel() and float(images.max()) > 1.5:
        raise ValueError(
            f"float images must be in [-1, 1] (the batch convention), got max {float(images.max()):.3g}; "
            "pass uint8 for [0, 255] images"
        )
    return to_uint8(images)


class FeatureStats:
    """Streaming accumulator of extractor features for FID (mean + scatter, float64) and KID
    (the features themselves, float32 as torch-fidelity keeps them).

    `extractor` is any callable uint8 (B, 3, H, W) -> (B, D) features; usually an
    `InceptionFeatureExtractor`. Only `update` needs it; `update_features` takes features.
    """

    def __init__(self, extractor: Callable[[Tensor], Tensor] | None = None, *, keep_features: bool = True):
        self.extractor = extractor
        self.keep_features = keep_features
        self.num_samples = 0
        self._mean: np.ndarray | None = None  # (D,) float64
        self._scatter: np.ndarray | None = None  # (D, D) float64, sum of centred outer products
        self._features: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        if self.extractor is None:
            raise ValueError("FeatureStats.update needs an extractor; pass one, or use update_features(features)")
        self.update_features(self.extractor(to_uint8_images(images)))

    def update_features(self, features: Tensor | np.ndarray) -> None:
        if isinstance(features, Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, dtype=np.float32)  # (B, D)
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (B, D), got {features.shape}")
        if self._mean is not None and features.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature width {features.shape[1]} != accumulated width {self._mean.shape[0]}")
        if len(features) == 0:
            return
        batch = features.astype(np.float64)
        batch_mean = batch.mean(axis=0)
        centred = batch - batch_mean
        self._merge(len(batch), batch_mean, centred.T @ centred)
        if self.keep_features:
            self._features.append(features)

    def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        # Chan et al. 1979 pairwise update: the sum-of-outer-products formula, centred per batch
        # so float64 does not lose the covariance to cancellation against the mean.
        if self._mean is None:
            self.num_samples, self._mean, self._scatter = count, mean.copy(), scatter.copy()
            return
        total = self.num_samples + count
        delta = mean - self._mean
        self._scatter += scatter + np.outer(delta, delta) * (self.num_samples * count / total)
        self._mean += delta * (count / total)
        self.num_samples = total

    def merge(self, other: FeatureStats) -> None:
        """Fold in statistics gathered elsewhere (another process or shard)."""
        if other.num_samples == 0:
            return
        self._merge(other.num_samples, other._mean, other._scatter)
        if self.keep_features:
            if not other.keep_features:
                raise ValueError("cannot merge stats without features into stats that keep features")
            self._features.append(other.features)

    @property
    def mean(self) -> np.ndarray:
        self._require(2, "a mean")
        return self._mean

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased (ddof=1) covariance, as `np.cov(features, rowvar=False)`."""
        self._require(2, "a covariance")
        return self._scatter / (self.num_samples - 1)

    @property
    def features(self) -> np.ndarray:
        if not self.keep_features:
            raise ValueError("these FeatureStats were built with keep_features=False; KID needs the features")
        if not self._features:
            return np.zeros((0, 0 if self._mean is None else len(self._mean)), dtype=np.float32)
        if len(self._features) > 1:
            self._features = [np.concatenate(self._features)]
        return self._features[0]

    def _require(self, n: int, what: str) -> None:
        if self.num_samples < n:
            raise ValueError(f"{what} needs at least {n} samples, these FeatureStats hold {self.num_samples}")

    def compute_fid(self, ref: FeatureStats) -> float:
        """Frechet distance between the two Gaussians, as torch_fidelity.metric_fid."""
        return frechet_distance(self.mean, self.covariance, ref.mean, ref.covariance)

    def compute_kid(
        self,
        ref: FeatureStats,
        subsets: int = KID_SUBSETS,
        subset_size: int | None = KID_SUBSET_SIZE,
        seed: int = KID_SEED,
    ) -> tuple[float, float]:
        """(mean, std) of KID over random subsets; `self` plays torch-fidelity's input1.
        subset_size=None uses min(1000, len(self), len(ref))."""
        return kernel_inception_distance(self.features, ref.features, subsets, subset_size, seed)

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Atomic `.npz` write (mean, scatter, count, features if kept, json metadata)."""
        self._require(1, "saving")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "num_samples": np.asarray(self.num_samples),
            "mean": self._mean,
            "scatter": self._scatter,
            "metadata": np.asarray(json.dumps(metadata or {}, sort_keys=True)),
        }
        if self.keep_features:
            arrays["features"] = self.features
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        try:
            with np.load(path, allow_pickle=False) as data:  # pickles and object arrays are refused
                stats = cls(keep_features="features" in data.files)
                stats.num_samples = int(data["num_samples"])
                stats._mean, stats._scatter = data["mean"], data["scatter"]
                if stats.keep_features:
                    stats._features = [data["features"]]
        except ValueError as err:  # numpy: "Cannot load file containing pickled data" / "Object arrays ..."
            if "pickle" not in str(err):
                raise
            from ldmkit.nn.weights_file import UntrustedWeightsError, untrusted_message

            raise UntrustedWeightsError(untrusted_message(
                path, "Feature statistics file", "it holds pickled Python objects",
                "ldmkit writes these files itself; delete it (or point the cache elsewhere) and it is recomputed.",
            )) from None
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Follows torch-fidelity 0.4.0 `fid_statistics_to_metric`: Tr((S1 S2)^(1/2)) is the sum of the
    square roots of the eigenvalues of S1 S2, taken in complex128 so tiny negative eigenvalues
    (rank-deficient covariances) contribute their (zero) real part. This replaces the older
    `scipy.linalg.sqrtm` + eps*I fallback and needs no fallback.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics do not match: mean {mu1.shape} vs {mu2.shape}, cov {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype("complex128")).real)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x.y / d + coef0)^degree, gamma = 1/d (torch-fidelity `kernel_poly` defaults)."""
    return (np.matmul(x, y.T) * (1.0 / x.shape[1]) + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 (Binkowski et al. 2018, eq. 2): diagonals of K_XX, K_YY excluded."""
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    k_xy_sum = k_xy.sum(axis=0).sum()
    return (kt_xx_sum + kt_yy_sum) / (m * (m - 1)) - 2 * k_xy_sum / (m * m)


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subsets: int = KID_SUBSETS,
    subset_size: int | None = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets drawn without replacement, with
    `np.random.RandomState(seed)` drawing input1's indices then input2's, as torch-fidelity."""
    n1, n2 = len(features1), len(features2)
    if subset_size is None:
        subset_size = min(KID_SUBSET_SIZE, n1, n2)
    if subset_size < 2 or n1 < subset_size or n2 < subset_size:
        raise ValueError(
            f"KID subset size {subset_size} needs 2 <= subset_size <= number of samples "
            f"(got {n1} and {n2}); lower kid_subset_size or sample more images"
        )
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        f1 = features1[rng.choice(n1, subset_size, replace=False)]
        f2 = features2[rng.choice(n2, subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(polynomial_kernel(f1, f1), polynomial_kernel(f1, f2), polynomial_kernel(f2, f2))
    return float(np.mean(mmds)), float(np.std(mmds))
