from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def single_threaded_blas():
    """One BLAS thread, like torch.set_num_threads(1) in tests/conftest.py: on the shared 2-core
    machine, OpenBLAS threads spin-waiting under load made a 2048-d eigvals cost 5x its CPU time."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1):
        yield


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of torch-fidelity's Inception-v3 with random, variance-preserving weights.

    The constructor always loads weights, so it is built with loading stubbed out; PyTorch's
    default init shrinks activations ~6x per layer (features ~1e-8), so convs are re-drawn with
    He init and BatchNorm running stats get a little spread to keep pool3 features O(1)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None), mock.patch.object(
        cls, "load_state_dict", lambda self, state_dict: None
    ):
        net = cls("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            module.running_var.fill_(1.0)
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture
def png_folder():
    return write_png_folder


def write_png_folder(folder: Path, count: int, size: int, seed: int, smooth: bool) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if smooth:  # colour gradients: a different distribution from the noise folder
            ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 255, (1, 1, 3))
            image = ramp + np.linspace(0, 1, size)[:, None, None] * rng.uniform(0, 255 - ramp.max(), (1, 1, 3))
        else:
            image = rng.uniform(0, 255, (size, size, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder
