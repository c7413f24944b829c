"""Distances between a generated and a reference image set in a feature space, beyond FID.

- Frechet distance (FD-DINOv2: Stein et al. 2023) on FeatureSet statistics, with fid.frechet_distance.
- CMMD (Jayasumana et al. 2024): the minimum-variance ("biased") MMD^2 estimator of Gretton et al.
  2012, eq. 5, with a Gaussian RBF kernel, sigma = 10, times 1000 (google-research cmmd/distance.py).
- Precision / recall (Kynkaanniemi et al. 2019, eq. 1-2): k-NN balls around each set's samples,
  k = 3 as their paper and torch-fidelity; a sample is inside a ball when its distance <= the radius.
- Density / coverage (Naeem et al. 2020, eq. 3-4): k = 5 as their paper; strict "<" as their `prdc`.
Every function takes (reference, generated) FeatureSets and refuses sets made differently.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldmkit.eval.features.common import FeatureSet, check_comparable
from ldmkit.eval.fid import frechet_distance

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
PR_K = 3
DC_K = 5
BLOCK = 4096  # rows per distance block: BLOCK x N float64 at a time


def _require(feature_set: FeatureSet, minimum: int, metric: str, role: str, fix: str) -> None:
    if feature_set.num_samples < minimum:
        raise ValueError(f"{metric} needs at least {minimum} {role} images, got {feature_set.num_samples}; {fix}")


def frechet_feature_distance(reference: FeatureSet, generated: FeatureSet, metric: str = "FD") -> float:
    """||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) (Heusel et al. 2017, eq. 6)."""
    check_comparable(reference, generated)
    for role, fs in (("reference", reference), ("generated", generated)):
        _require(fs, 2, metric, role, "a covariance needs 2 samples (and an unbiased FD many more than the "
                 "feature width): sample more images")
    r, g = reference.stats, generated.stats
    return frechet_distance(g.mean, g.covariance, r.mean, r.covariance)


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-||a - b||^2 / (2 sigma^2)),
    every mean over all pairs including i = j (the minimum-variance estimator), in float64."""
    xt, yt = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y, np.float64))
    gamma = 1.0 / (2 * sigma**2)
    return float(scale * (_mean_kernel(xt, xt, gamma) + _mean_kernel(yt, yt, gamma) - 2 * _mean_kernel(xt, yt, gamma)))


def _mean_kernel(a: Tensor, b: Tensor, gamma: float) -> float:
    total = 0.0
    for block in a.split(BLOCK):
        total += float(torch.exp(-gamma * torch.cdist(block, b).square()).sum())  # (block, Nb)
    return total / (len(a) * len(b))


def cmmd(reference: FeatureSet, generated: FeatureSet, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD on (already L2-normalised) CLIP embeddings."""
    check_comparable(reference, generated)
    for role, fs in (("reference", reference), ("generated", generated)):
        _require(fs, 2, "CMMD", role, "sample more images")
    return mmd_rbf(reference.features, generated.features, sigma, scale)


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance from each sample to its k-th nearest other sample (self, at 0, is the first)."""
    radii = [torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(BLOCK)]
    return torch.cat(radii)  # (N,)


def precision_recall(reference: FeatureSet, generated: FeatureSet, k: int = PR_K) -> dict[str, float]:
    """Improved precision (generated inside the reference manifold) and recall (the reverse)."""
    real, fake = _pair(reference, generated, k, "precision/recall")
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    precision = torch.cat([(torch.cdist(block, real) <= real_radii).any(dim=1) for block in fake.split(BLOCK)])
    recall = torch.cat([(torch.cdist(block, fake) <= fake_radii).any(dim=1) for block in real.split(BLOCK)])
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


def density_coverage(reference: FeatureSet, generated: FeatureSet, k: int = DC_K) -> dict[str, float]:
    """density = (1 / kM) sum_j sum_i 1[Y_j in B(X_i, r_i)]; coverage = (1 / N) sum_i 1[min_j |X_i - Y_j| < r_i]."""
    real, fake = _pair(reference, generated, k, "density/coverage")
    real_radii = knn_radii(real, k)
    inside, covered = 0.0, []
    for block, radii in zip(real.split(BLOCK), real_radii.split(BLOCK)):
        distances = torch.cdist(block, fake)  # (block, M)
        inside += float((distances < radii[:, None]).sum())
        covered.append(distances.min(dim=1).values < radii)
    return {"density": inside / (k * len(fake)), "coverage": float(torch.cat(covered).double().mean())}


def _pair(reference: FeatureSet, generated: FeatureSet, k: int, metric: str) -> tuple[Tensor, Tensor]:
    check_comparable(reference, generated)
    if k < 1:
        raise ValueError(f"{metric}: k must be >= 1, got {k}")
    for role, fs in (("reference", reference), ("generated", generated)):
        _require(fs, k + 1, f"{metric} with k={k}", role,
                 f"each image needs k={k} other images of its set (k + 1 = {k + 1}): sample more images or lower k")
    as_tensor = lambda fs: torch.from_numpy(np.asarray(fs.features, np.float64))  # noqa: E731  (N, D)
    return as_tensor(reference), as_tensor(generated)
