"""FID and KID on torch-fidelity's Inception-v3, with streaming feature statistics.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-ported 2015-12-05
weights every published FID uses), built without its own loader (which unpickles the weights
file fully) and given the state dict we read with `weights_only=True`. The metric math follows
`torch_fidelity/metric_fid.py` and `metric_kid.py` (v0.4.0) line by line, so numbers are comparable
to `torch_fidelity.calculate_metrics` on the same images (tests check this).

FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...", eq. (6).
KID: Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3 (unbiased MMD^2, cubic kernel).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ldmkit.images import to_uint8

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
# SHA-256 of the official file (torch-fidelity v0.2.0 release; byte-identical to pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth): the name carries its first 8 hex digits, as torch.hub expects.
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_WEIGHTS_ENV = "LDMKIT_INCEPTION_WEIGHTS"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # torch-fidelity's `samples_find_ext` default

# torch-fidelity defaults (torch_fidelity/defaults.py)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The Inception-v3 weights file needed for FID/KID is not on disk."""


class UnofficialInceptionWeightsWarning(UserWarning):
    """The Inception-v3 weights are not the official file: FID/KID are not comparable to published numbers."""


def hub_inception_weights_path() -> Path:
    """Where `torch.hub.load_state_dict_from_url` (and so torch-fidelity) caches the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """First existing file of: `path` (cfg `eval.inception_path`), `$LDMKIT_INCEPTION_WEIGHTS`,
    the torch hub cache. Never downloads; raises `InceptionWeightsNotFoundError` with the fix."""
    env = os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    hub = hub_inception_weights_path()
    candidates = [("eval.inception_path", path), (f"${INCEPTION_WEIGHTS_ENV}", env), ("torch hub cache", hub)]
    for _, candidate in candidates:
        if candidate is not None and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    looked = "\n".join(
        f"  - {source}: {candidate if candidate is not None else '(not set)'}"
        + ("" if candidate is None else " (no such file)")
        for source, candidate in candidates
    )
    raise InceptionWeightsNotFoundError(
        f"FID/KID need the Inception-v3 weights file {INCEPTION_WEIGHTS_FILENAME!r} and it was not found.\n"
        f"Looked in:\n{looked}\n"
        f"Fix: on a machine with internet, download {INCEPTION_WEIGHTS_URL} and put it at {hub} "
        f"(e.g. `mkdir -p {hub.parent} && wget -O {hub} {INCEPTION_WEIGHTS_URL}`), "
        f"or point to a copy with `eval.inception_path=/path/to/{INCEPTION_WEIGHTS_FILENAME}` "
        f"(or the environment variable {INCEPTION_WEIGHTS_ENV})."
    )


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warn_if_unofficial(path: Path, sha256: str) -> bool:
    """Warn (UnofficialInceptionWeightsWarning) unless `sha256` is the official file's; True if official."""
    if sha256 == INCEPTION_WEIGHTS_SHA256:
        return True
    warnings.warn(
        f"Inception weights '{path}' are not the official {INCEPTION_WEIGHTS_FILENAME} (SHA-256 {sha256[:16]}..., "
        f"expected {INCEPTION_WEIGHTS_SHA256[:16]}...). FID/KID computed with them are NOT comparable to published "
        f"numbers nor to runs with the official weights, only to runs with this same file. For comparable numbers "
        f"use the file from {INCEPTION_WEIGHTS_URL}.",
        UnofficialInceptionWeightsWarning,
        stacklevel=3,
    )
    return False


_BUILD_LOCK = threading.Lock()


def build_inception(state_dict: dict[str, Tensor], weights_path: Path | None = None) -> nn.Module:
    """torch-fidelity's `FeatureExtractorInceptionV3` holding `state_dict`, built without its loader.

    Its constructor reads weights itself, with `torch.load(path, weights_only=False)` (a full
    unpickle: a crafted file runs code) or by downloading. It is handed the state dict we already
    read with `weights_only=True` through its download hook instead, so neither happens; renaming
    the hook in a future torch-fidelity makes this fail loudly (AttributeError), never download.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from ldmkit.nn.weights_file import WeightsFileError

    with _BUILD_LOCK:
        hook = tf_inception.load_state_dict_from_url
        tf_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            return tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", [InceptionFeatureExtractor.feature_layer])
        except RuntimeError as err:  # load_state_dict(strict=True): missing/unexpected keys or shapes
            found = [kind for kind in ("Missing key(s)", "Unexpected key(s)", "size mismatch") if kind in str(err)]
            raise WeightsFileError(
                f"'{weights_path}' is not torch-fidelity's Inception-v3 weights file ({INCEPTION_WEIGHTS_FILENAME}): "
                f"{', '.join(found) or str(err).splitlines()[0]} against its network. "
                f"Download the official file from {INCEPTION_WEIGHTS_URL}."
            ) from err
        finally:
            tf_inception.load_state_dict_from_url = hook


class InceptionFeatureExtractor(nn.Module):
    """uint8 images (B, 3, H, W) -> pool3 features (B, 2048) float32, via torch-fidelity.

    Resizing to 299x299 (TF1-compatible bilinear) and scaling happen inside torch-fidelity's
    module, exactly as in `torch_fidelity.calculate_metrics`. The weights file (`.pth` or
    `.safetensors`) is read with `weights_only=True`: one that needs code to load is refused
    (`UntrustedWeightsError`); one that is not the official file gets a warning (`official` is False).
    """

    dim = 2048
    feature_layer = "2048"

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        from ldmkit.nn.weights_file import load_state_dict_file

        self.weights_path = resolve_inception_weights(weights_path)
        state_dict = load_state_dict_file(self.weights_path, "Inception-v3 weights file (FID/KID)")
        self.net = build_inception(state_dict, self.weights_path).to(device)
        self.sha256 = _file_digest(self.weights_path)
        self.official = warn_if_unofficial(self.weights_path, self.sha256)
        if torch.device(device).type == "cpu":
            # oneDNN's NHWC convolutions and pooling: ~25% less CPU time per image, features equal to
            # ~1e-6 relative (bench/fid_throughput.py, BENCHMARKS.md); not measured on CUDA, so left as is there.
            self.net.to(memory_format=torch.channels_last)
        # Reference statistics are only reusable with the very same weights: key caches on their hash.
        self.identity = f"torch-fidelity-inception-v3-compat/{self.feature_layer}/{self.sha256[:16]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        (features,) = self.net(to_uint8_images(images).to(device))
        return features.float()  # (B, 2048)


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


# --- image folders -------------------------------------------------------------------------


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Images directly in `folder` (not recursive), sorted by real path like torch-fidelity,
    so KID subsets pick the same images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist")
    files = [
        Path(os.path.realpath(p))
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    return sorted(files, key=str)


def read_image_uint8(path: str | os.PathLike) -> Tensor:
    """(3, H, W) uint8, RGB."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def folder_feature_stats(
    folder: str | os.PathLike,
    extractor: Callable[[Tensor], Tensor],
    batch_size: int = 64,
    keep_features: bool = True,
) -> FeatureStats:
    """FeatureStats of every png/jpg/jpeg directly in `folder`."""
    files = list_image_files(folder)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}")
    stats = FeatureStats(extractor, keep_features=keep_features)
    for start in range(0, len(files), batch_size):
        images = [read_image_uint8(p) for p in files[start : start + batch_size]]
        if len({tuple(im.shape) for im in images}) == 1:
            stats.update(torch.stack(images))
        else:  # mixed sizes cannot be stacked; Inception resizes each to 299 anyway
            for image in images:
                stats.update(image[None])
    return stats


# --- cached reference statistics -----------------------------------------------------------


def reference_stats_key(dataset: str, split: str, resolution: int, extractor_id: str, **extra: Any) -> str:
    """Stable hash of everything that changes reference statistics."""
    fields = {"dataset": dataset, "split": split, "resolution": resolution, "extractor": extractor_id, **extra}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_stats(
    batches: Iterable[Tensor | dict[str, Any]],
    extractor: Callable[[Tensor], Tensor],
    cache_dir: str | os.PathLike,
    *,
    dataset: str,
    split: str,
    resolution: int,
    max_images: int | None = None,
) -> FeatureStats:
    """Reference FeatureStats for (dataset, split, resolution, extractor), computed once and then
    read from `cache_dir`. `batches` (e.g. a datamodule's dataloader; dicts use their "image"
    entry) is only iterated on a cache miss. The extractor's `identity` attribute, when present,
    is part of the key (InceptionFeatureExtractor hashes its weights file)."""
    extractor_id = getattr(extractor, "identity", type(extractor).__qualname__)
    key = reference_stats_key(dataset, split, resolution, extractor_id, max_images=max_images)
    path = Path(cache_dir) / f"ref-{_slug(dataset)}-{_slug(split)}-{resolution}px-{key}.npz"
    if path.is_file():
        return FeatureStats.load(path)
    stats = FeatureStats(extractor)
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch
        if max_images is not None:
            images = images[: max_images - stats.num_samples]
        if len(images):
            stats.update(images)
        if max_images is not None and stats.num_samples >= max_images:
            break
    metadata = {"dataset": dataset, "split": split, "resolution": resolution, "extractor": extractor_id,
                "max_images": max_images, "num_samples": stats.num_samples}
    stats.save(path, metadata)
    return stats


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:40]
