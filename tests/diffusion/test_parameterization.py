import itertools

import pytest
import torch

from ldmkit.diffusion.parameterization import (
    PREDICTIONS,
    convert,
    from_x0,
    target,
    to_eps,
    to_score,
    to_v,
    to_x0,
)

from .helpers import Gaussian


def _data(seed=0, shape=(5, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    alpha_bar = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
    ab = alpha_bar.view(-1, 1, 1, 1)
    return x0, noise, alpha_bar, ab.sqrt() * x0 + (1 - ab).sqrt() * noise


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_targets_convert_back_to_the_truth(prediction):
    x0, noise, alpha_bar, x_t = _data()
    y = target(prediction, x0, noise, alpha_bar)
    ab = alpha_bar.view(-1, 1, 1, 1)
    assert torch.allclose(to_x0(y, x_t, alpha_bar, prediction), x0, atol=1e-12)
    assert torch.allclose(to_eps(y, x_t, alpha_bar, prediction), noise, atol=1e-12)
    assert torch.allclose(to_v(y, x_t, alpha_bar, prediction), ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-12)
    assert torch.allclose(from_x0(x0, x_t, alpha_bar, prediction), y, atol=1e-12)


@pytest.mark.parametrize("source,destination", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_round_trips(source, destination):
    _, noise, alpha_bar, x_t = _data(1)
    pred = torch.randn_like(x_t)
    there = convert(pred, x_t, alpha_bar, source, destination)
    assert torch.allclose(convert(there, x_t, alpha_bar, destination, source), pred, atol=1e-10)
    # alpha_bar as a python float and as an already-broadcast (B,1,1,1) tensor give the same answer
    one = convert(pred[:1], x_t[:1], float(alpha_bar[0]), source, destination)
    assert torch.allclose(one, there[:1], atol=1e-12)
    assert torch.allclose(convert(pred, x_t, alpha_bar.view(-1, 1, 1, 1), source, destination), there, atol=1e-12)


def test_score_of_gaussian_data():
    # q(x_t) = N(α μ, α² s² + σ²): score -(x - α μ)/(α² s² + σ²); the exact denoiser's ε̂ must give it
    data = Gaussian(mean=[0.5, -1.0], std=[0.3, 2.0])
    x_t = torch.randn(7, 2, dtype=torch.float64)
    ab = 0.3
    x0_hat = data.posterior_mean(x_t, ab)
    exact = -(x_t - ab**0.5 * data.mean) / (ab * data.std**2 + 1 - ab)
    for prediction in PREDICTIONS:
        pred = from_x0(x0_hat, x_t, ab, prediction)
        assert torch.allclose(to_score(pred, x_t, ab, prediction), exact, atol=1e-12)


def test_zero_snr_v_and_x0_are_well_defined():
    x_t, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(to_x0(v, x_t, 0.0, "v"), -v)  # pure noise: x̂_0 = -v
    assert torch.equal(to_eps(v, x_t, 0.0, "v"), x_t)  # and ε̂ = x_t
    assert torch.isinf(to_x0(v, x_t, 0.0, "eps")).any()  # an eps-model cannot say anything about x_0 there


def test_dtype_follows_x():
    x0, noise, alpha_bar, x_t = _data()
    out = to_x0(noise.float(), x_t.float(), alpha_bar, "v")  # float64 ᾱ, float32 tensors
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="choose one of"):
        to_x0(noise, x_t, alpha_bar, "epsilon")
