"""What the network predicts (`eps`, `v`, `x0`, `flow`) and every conversion between them, from (α, σ).

A noise process puts x_t = α x_0 + σ ε (ldmkit.diffusion.processes). The predictions:
    eps:   ε                                          (Ho et al. 2020)
    v:     v = α ε - σ x_0                            (Salimans & Ho 2022, §4)
    x0:    x_0
    flow:  u = dx_t/dt = α' x_0 + σ' ε                (Lipman et al. 2023; Liu et al. 2023: for rectified
                                                       flow α = 1-t, σ = t, so u = ε - x_0)
    score  ∇ log q(x_t) = -ε / σ                      (Song et al. 2021)
Every prediction is affine in (x_0, ε) at fixed x_t, so each pair converts exactly; training targets
(`target`) and sampling (`to_x0`) share this one table.

The noise level argument (`level`) is any of:
- a `PathPoint` (or a `NoiseLevel`, or anything with `.alpha` and `.sigma`, optionally `.d_alpha`,
  `.d_sigma` for `flow` and `.alpha_bar` / `.variance_preserving` for the VP shortcut);
- for variance-preserving processes, ᾱ itself: a python float, a 0-d tensor, a (B,) tensor (broadcast over
  x's trailing dims) or a tensor already broadcastable to x, with (α, σ) = (sqrt(ᾱ), sqrt(1 - ᾱ)).
On VP points (α² + σ² = 1) the `v` conversions skip the division by α² + σ², so results are unchanged
bit for bit from the ᾱ-only code this replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PREDICTIONS = ("eps", "v", "x0")  # defined at every noise level of every process
DERIVATIVE_PREDICTIONS = ("flow",)  # need the process's time derivatives (α', σ')
ALL_PREDICTIONS = PREDICTIONS + DERIVATIVE_PREDICTIONS

Coef = Tensor | float


@dataclass(frozen=True)
class PathPoint:
    """(α, σ) of x_t = α x_0 + σ ε at some t, with their time derivatives (α', σ') when known.
    Coefficients are floats or tensors broadcastable against x (see `path_point`)."""

    alpha: Coef
    sigma: Coef
    d_alpha: Coef | None = None
    d_sigma: Coef | None = None
    variance_preserving: bool = False


def _unknown_prediction(prediction: str) -> ValueError:
    return ValueError(f"Unknown prediction type '{prediction}'; choose one of {', '.join(ALL_PREDICTIONS)}.")


def check_prediction(prediction: str) -> str:
    if prediction not in ALL_PREDICTIONS:
        raise _unknown_prediction(prediction)
    return prediction


def _shape(coef: Any, like: Tensor) -> Coef | None:
    if coef is None or isinstance(coef, (float, int)):
        return None if coef is None else float(coef)
    c = torch.as_tensor(coef, device=like.device)
    if c.ndim == 1 and like.ndim > 1:
        c = c.view(-1, *([1] * (like.ndim - 1)))
    return c.to(like.dtype)


def alpha_sigma(alpha_bar: Tensor | float, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """VP: (α, σ) = (sqrt(ᾱ), sqrt(1 - ᾱ)), shaped to broadcast against `like` and in its dtype."""
    if isinstance(alpha_bar, (float, int)):
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    ab = torch.as_tensor(alpha_bar, device=like.device)
    if ab.ndim == 1 and like.ndim > 1:
        ab = ab.view(-1, *([1] * (like.ndim - 1)))
    if ab.dtype != torch.float64 and like.device.type != "mps":
        ab = ab.to(torch.float64)  # 1 - ᾱ near t=0 needs the digits
    return ab.sqrt().to(like.dtype), (1 - ab).clamp(min=0).sqrt().to(like.dtype)


def path_point(level: Any, like: Tensor) -> PathPoint:
    """`level` (see module docstring) as a PathPoint whose coefficients broadcast against `like`."""
    if isinstance(level, (float, int, Tensor)):
        alpha, sigma = alpha_sigma(level, like)
        return PathPoint(alpha, sigma, variance_preserving=True)
    if not hasattr(level, "alpha") or not hasattr(level, "sigma"):
        raise TypeError(f"a noise level must be ᾱ (float/tensor) or have .alpha and .sigma, got {type(level).__name__}")
    return PathPoint(
        _shape(level.alpha, like), _shape(level.sigma, like), _shape(getattr(level, "d_alpha", None), like),
        _shape(getattr(level, "d_sigma", None), like), bool(getattr(level, "variance_preserving", False)),
    )


def _derivatives(p: PathPoint) -> tuple[Coef, Coef]:
    if p.d_alpha is None or p.d_sigma is None:
        raise ValueError(
            "prediction='flow' needs the process's time derivatives (α', σ'), which this noise level does not carry. "
            "Use a continuous-time process (e.g. process=rectified_flow) with flow prediction, or predict eps / v / x0."
        )
    return p.d_alpha, p.d_sigma


def _x0_eps(pred: Tensor, x_t: Tensor, p: PathPoint, prediction: str) -> tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) from a raw prediction, by solving x_t = α x_0 + σ ε together with the prediction's equation."""
    a, s = p.alpha, p.sigma
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    if prediction == "v":  # v = α ε - σ x_0
        if p.variance_preserving:
            return a * x_t - s * pred, a * pred + s * x_t
        norm = a * a + s * s
        return (a * x_t - s * pred) / norm, (a * pred + s * x_t) / norm
    if prediction == "flow":  # u = α' x_0 + σ' ε; det = α σ' - σ α'
        da, ds = _derivatives(p)
        det = a * ds - s * da
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
    raise _unknown_prediction(prediction)


def to_x0(pred: Tensor, x_t: Tensor, level: Any, prediction: str) -> Tensor:
    """x̂_0 from a raw prediction."""
    p = path_point(level, x_t)
    if prediction == "eps":
        return (x_t - p.sigma * pred) / p.alpha
    if prediction == "v" and p.variance_preserving:
        return p.alpha * x_t - p.sigma * pred
    if prediction == "x0":
        return pred
    return _x0_eps(pred, x_t, p, prediction)[0]


def to_eps(pred: Tensor, x_t: Tensor, level: Any, prediction: str) -> Tensor:
    """ε̂ from a raw prediction."""
    p = path_point(level, x_t)
    if prediction == "eps":
        return pred
    if prediction == "v" and p.variance_preserving:
        return p.alpha * pred + p.sigma * x_t
    if prediction == "x0":
        return (x_t - p.alpha * pred) / p.sigma
    return _x0_eps(pred, x_t, p, prediction)[1]


def to_v(pred: Tensor, x_t: Tensor, level: Any, prediction: str) -> Tensor:
    """v̂ = α ε̂ - σ x̂_0 from a raw prediction."""
    p = path_point(level, x_t)
    if prediction == "v":
        return pred
    if p.variance_preserving and prediction == "eps":
        return (pred - p.sigma * x_t) / p.alpha
    if p.variance_preserving and prediction == "x0":
        return (p.alpha * x_t - pred) / p.sigma
    x0, eps = _x0_eps(pred, x_t, p, prediction)
    return p.alpha * eps - p.sigma * x0


def to_flow(pred: Tensor, x_t: Tensor, level: Any, prediction: str) -> Tensor:
    """û = α' x̂_0 + σ' ε̂ from a raw prediction (needs the level's time derivatives)."""
    p = path_point(level, x_t)
    if prediction == "flow":
        return pred
    da, ds = _derivatives(p)
    x0, eps = _x0_eps(pred, x_t, p, prediction)
    return da * x0 + ds * eps


def to_score(pred: Tensor, x_t: Tensor, level: Any, prediction: str) -> Tensor:
    """∇_x log q_t(x_t) ≈ -ε̂ / σ."""
    p = path_point(level, x_t)
    return -to_eps(pred, x_t, p, prediction) / p.sigma


def from_x0(x0: Tensor, x_t: Tensor, level: Any, prediction: str) -> Tensor:
    """The raw prediction that `to_x0` maps to `x0` (its inverse at fixed x_t)."""
    return convert(x0, x_t, level, "x0", prediction)


_TO = {"x0": to_x0, "eps": to_eps, "v": to_v, "flow": to_flow}


def convert(pred: Tensor, x_t: Tensor, level: Any, source: str, destination: str) -> Tensor:
    """A prediction in `source` parameterisation expressed in `destination` (`eps`, `v`, `x0`, `flow`)."""
    check_prediction(destination)
    return _TO[destination](pred, x_t, level, source)


def target(prediction: str, x0: Tensor, noise: Tensor, level: Any) -> Tensor:
    """Training target for x_t = α x0 + σ noise: the value `prediction` should output."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    p = path_point(level, x0)
    if prediction == "v":
        return p.alpha * noise - p.sigma * x0
    if prediction == "flow":
        da, ds = _derivatives(p)
        return da * x0 + ds * noise
    raise _unknown_prediction(prediction)


def prediction_error_scale(prediction: str, level: Any, like: Tensor) -> Tensor | float:
    """c with ||prediction error||² = c · ||x̂_0 error||² at fixed x_t (the Jacobian of the conversion, squared):
    eps (α/σ)², v ((α² + σ²)/σ)², x0 1, flow ((α σ' - σ α')/σ)²."""
    p = path_point(level, like)
    a, s = p.alpha, p.sigma
    if prediction == "eps":
        return (a / s) ** 2
    if prediction == "v":
        return ((a * a + s * s) / s) ** 2
    if prediction == "x0":
        return 1.0
    if prediction == "flow":
        da, ds = _derivatives(p)
        return ((a * ds - s * da) / s) ** 2
    raise _unknown_prediction(prediction)
