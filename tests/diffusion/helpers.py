"""Shared test models: data N(μ, diag s²) has the exact denoiser E[x_0 | x_t] in closed form."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldmkit.diffusion.parameterization import from_x0
from ldmkit.diffusion.schedules import NoiseLevel, Schedule


class Gaussian:
    """Data x_0 ~ N(mean, diag(std²)) over the last dimension."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def posterior_mean(self, x: Tensor, alpha_bar: Tensor | float) -> Tensor:
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        ab = ab.view(-1, *([1] * (x.ndim - 1))) if ab.ndim == 1 else ab
        alpha, var = ab.sqrt(), self.std**2
        return self.mean + alpha * var / (ab * var + (1 - ab)) * (x - alpha * self.mean)

    def model(self, schedule: Schedule, prediction: str, wiggle: float = 0.0, round_t: bool = False):
        """`model(x_t, t)` returning the exact denoiser in `prediction` form, optionally plus a smooth
        nonlinear t-dependent term (so solvers' multistep/corrector terms matter in comparisons)."""

        def model(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(torch.float64)
            t = t.round() if round_t else t
            ab = schedule.alpha_bar_at(t)
            x0 = self.posterior_mean(x, ab)
            if wiggle:
                x0 = x0 + wiggle * torch.sin(3 * x + t.view(-1, *([1] * (x.ndim - 1))) / 250)
            return from_x0(x0, x, ab, prediction)

        return model

    def marginal(self, level: NoiseLevel, z: Tensor) -> Tensor:
        """x_t at `level` for standard normal z (a quantile map: the exact PF-ODE keeps z fixed)."""
        return level.alpha * self.mean + (level.alpha_bar * self.std**2 + 1 - level.alpha_bar).sqrt() * z

    def ode_endpoint(self, z: Tensor) -> Tensor:
        return self.mean + self.std * z


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def log2_ratio(a: float, b: float) -> float:
    return math.log2(a / b)
