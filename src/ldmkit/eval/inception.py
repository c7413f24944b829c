"""torch-fidelity's Inception-v3 feature extractor for FID/KID, with its weights read safely.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-ported 2015-12-05
weights every published FID uses), built without its own loader (which unpickles the weights
file fully) and given the state dict we read with `weights_only=True`. The weights file is found
(never downloaded) and checked against the official file's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit.eval.fid import to_uint8_images

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
# SHA-256 of the official file (torch-fidelity v0.2.0 release; byte-identical to pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth): the name carries its first 8 hex digits, as torch.hub expects.
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_WEIGHTS_ENV = "LDMKIT_INCEPTION_WEIGHTS"


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
