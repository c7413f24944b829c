"""What the network predicts (`eps`, `v`, `x0`) and every conversion between them.

With x_t = α x_0 + σ ε (α = sqrt(ᾱ), σ = sqrt(1 - ᾱ), α² + σ² = 1):
    eps:  ε                                   (Ho et al. 2020)
    v:    v = α ε - σ x_0                     (Salimans & Ho 2022, eq. in §4)
    x0:   x_0
    score ∇ log q(x_t) = -ε / σ               (Song et al. 2021)
All conversions are affine in the prediction with coefficients from (α, σ), so training targets
(`target`) and sampling (`to_x0`) share this one table. Training and sampling both import it.

`alpha_bar` may be a python float, a 0-d tensor, a (B,) tensor (broadcast over x's trailing dims),
or a tensor already broadcastable to x (e.g. (B, 1, 1, 1)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTIONS = ("eps", "v", "x0")


def _unknown_prediction(prediction: str) -> ValueError:
    return ValueError(f"Unknown prediction type '{prediction}'; choose one of {', '.join(PREDICTIONS)}.")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise _unknown_prediction(prediction)
    return prediction


def alpha_sigma(alpha_bar: Tensor | float, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """(α, σ) = (sqrt(ᾱ), sqrt(1 - ᾱ)), shaped to broadcast against `like` and in its dtype."""
    if isinstance(alpha_bar, (float, int)):
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    ab = torch.as_tensor(alpha_bar, device=like.device)
    if ab.ndim == 1 and like.ndim > 1:
        ab = ab.view(-1, *([1] * (like.ndim - 1)))
    if ab.dtype != torch.float64 and like.device.type != "mps":
        ab = ab.to(torch.float64)  # 1 - ᾱ near t=0 needs the digits
    return ab.sqrt().to(like.dtype), (1 - ab).clamp(min=0).sqrt().to(like.dtype)


def to_x0(pred: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """x̂_0 from a raw prediction."""
    alpha, sigma = alpha_sigma(alpha_bar, x_t)
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha
    if prediction == "v":
        return alpha * x_t - sigma * pred
    if prediction == "x0":
        return pred
    raise _unknown_prediction(prediction)


def to_eps(pred: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """ε̂ from a raw prediction."""
    alpha, sigma = alpha_sigma(alpha_bar, x_t)
    if prediction == "eps":
        return pred
    if prediction == "v":
        return alpha * pred + sigma * x_t
    if prediction == "x0":
        return (x_t - alpha * pred) / sigma
    raise _unknown_prediction(prediction)


def to_v(pred: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """v̂ = α ε̂ - σ x̂_0 from a raw prediction."""
    alpha, sigma = alpha_sigma(alpha_bar, x_t)
    if prediction == "eps":
        return (pred - sigma * x_t) / alpha
    if prediction == "v":
        return pred
    if prediction == "x0":
        return (alpha * x_t - pred) / sigma
    raise _unknown_prediction(prediction)


def to_score(pred: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """∇_x log q_t(x_t) ≈ -ε̂ / σ (VP scale)."""
    _, sigma = alpha_sigma(alpha_bar, x_t)
    return -to_eps(pred, x_t, alpha_bar, prediction) / sigma


def from_x0(x0: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """The raw prediction that `to_x0` maps to `x0` (its inverse at fixed x_t)."""
    return convert(x0, x_t, alpha_bar, "x0", prediction)


def convert(pred: Tensor, x_t: Tensor, alpha_bar: Tensor | float, source: str, destination: str) -> Tensor:
    """A prediction in `source` parameterisation expressed in `destination` (`eps`, `v` or `x0`)."""
    check_prediction(destination)
    if destination == "x0":
        return to_x0(pred, x_t, alpha_bar, source)
    if destination == "eps":
        return to_eps(pred, x_t, alpha_bar, source)
    return to_v(pred, x_t, alpha_bar, source)


def target(prediction: str, x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Training target for x_t = α x0 + σ noise: the value `prediction` should output."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        alpha, sigma = alpha_sigma(alpha_bar, x0)
        return alpha * noise - sigma * x0
    raise _unknown_prediction(prediction)
