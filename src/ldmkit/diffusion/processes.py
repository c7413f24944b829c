"""Noise processes: how data becomes noise, x_t = α(t) x_0 + σ(t) ε, and everything that depends on it.

The contract (`NoiseProcess`): a process maps its time t to (α, σ) (`path`), owns the network's time input
(`model_time`), the training-time distribution of t (`sample_time`), the sampling grid a sampler walks
(`sampling_grid`, a list of `NoiseLevel`s carrying t, α and σ), and how it is recorded in an artifact
(`to_artifact` / `process_from_artifact`). Samplers, guidance, parameterisations and the training
objective only see (α, σ) and the process's methods, so a second process (rectified flow, issue 15)
slots in beside this one without a copy of any of them: subclass `NoiseProcess` and register its kind
in `PROCESS_KINDS`.

Implementations: `ldmkit.diffusion.vp.DiscreteVP` (alias `Schedule`), the discrete variance-preserving
schedules (`make_schedule`), and `ldmkit.diffusion.flow.RectifiedFlow`, x_t = (1 - t) x_0 + t ε with SD3 / Flux
time shifts (its conventions are in its module). Conventions of the VP schedules:
- Discrete timesteps t = 0 .. T-1; t = T-1 is the noisiest. ᾱ_t = prod_{s<=t} (1 - β_s). The network's
  time input is t itself (`model_time` is the identity), integer in training, fractional between grid points.
- Variance-preserving (VP) scale: x_t = α_t x_0 + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t).
- "k-sigma" (variance-exploding scale, k-diffusion / EDM): σ̃_t = σ_t / α_t = sqrt((1 - ᾱ_t) / ᾱ_t);
  `Schedule.sigmas` holds it. x_t / α_t = x_0 + σ̃_t ε.
- Fractional timesteps interpolate log σ̃ (= -log-SNR / 2) linearly between integers, and
  `Schedule.timestep_at_sigma` is its exact inverse (the k-diffusion / diffusers `_sigma_to_t` rule).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldmkit.diffusion.parameterization import PathPoint

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SPACINGS = ("karras", "exponential")
SPACINGS = TIMESTEP_SPACINGS + SIGMA_SPACINGS
TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")


class ProcessError(ValueError):
    """A noise process asked for something it does not define (e.g. a sampler or prediction for another family)."""


# ---- the grid a sampler walks ----------------------------------------------------------------


@dataclass(frozen=True)
class NoiseLevel:
    """One point of a sampling grid (python floats, float64): the process time t, α and σ there.

    `t` is the process's own time (for discrete VP the fractional timestep; -1 marks the clean end point,
    never evaluated); the network sees `process.model_time(t)`. `alpha_bar` is α²/(α² + σ²), the VP-equivalent
    ᾱ (for VP levels the exact table value, so VP arithmetic stays bit for bit). `d_alpha`/`d_sigma` are
    dα/dt, dσ/dt where the process defines them (needed for `flow` predictions)."""

    t: float
    alpha: float
    sigma: float
    alpha_bar: float
    variance_preserving: bool = False
    d_alpha: float | None = None
    d_sigma: float | None = None

    @classmethod
    def from_alpha_bar(cls, t: float, alpha_bar: float) -> "NoiseLevel":
        """A VP level: α = sqrt(ᾱ), σ = sqrt(1 - ᾱ)."""
        return cls(float(t), math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), float(alpha_bar), True)

    @classmethod
    def from_alpha_sigma(cls, t: float, alpha: float, sigma: float, d_alpha: float | None = None,
                         d_sigma: float | None = None) -> "NoiseLevel":
        norm = alpha * alpha + sigma * sigma
        return cls(float(t), float(alpha), float(sigma), alpha * alpha / norm, False, d_alpha, d_sigma)

    @property
    def sigma_ve(self) -> float:
        """k-sigma σ/α: +inf at zero SNR, 0 when clean."""
        return math.inf if self.alpha == 0 else self.sigma / self.alpha

    @property
    def lam(self) -> float:
        """Half log-SNR λ = log(α/σ): -inf at zero SNR, +inf when clean (DPM-Solver's time variable)."""
        if self.alpha == 0:
            return -math.inf
        if self.sigma == 0:
            return math.inf
        if self.variance_preserving:
            return 0.5 * (math.log(self.alpha_bar) - math.log1p(-self.alpha_bar))
        return math.log(self.alpha) - math.log(self.sigma)

    @property
    def is_clean(self) -> bool:
        return self.sigma == 0.0


# ---- the contract ----------------------------------------------------------------------------


class NoiseProcess:
    """x_t = α(t) x_0 + σ(t) ε. Subclasses implement the methods that raise here; see the module docstring.

    Time tensors are (B,); `path` returns float64 coefficients (float32 on MPS) on t's device."""

    kind: str = "abstract"
    variance_preserving: bool = False
    has_time_derivatives: bool | None = None  # path carries (α', σ') (`flow` is defined); None: ask `path`
    ode_in_process_time: bool = False  # Heun integrates dx/dt in the process's t (else dx̃/dσ̃, Karras et al.)
    grid_options: tuple[str, ...] = ()  # keyword options of `sampling_grid` besides steps and spacing

    # -- the path
    def path(self, t: Tensor) -> PathPoint:
        """(α, σ) (and α', σ' where defined) at process times t (B,)."""
        raise NotImplementedError

    def snr_at(self, t: Tensor) -> Tensor:
        """α² / σ² at t (B,)."""
        p = self.path(t)
        return (p.alpha / p.sigma) ** 2

    @property
    def has_zero_terminal_snr(self) -> bool:
        """True when the noisiest point is pure noise (α = 0), where an eps-prediction is undefined."""
        raise NotImplementedError

    # -- the network's time input
    def model_time(self, t: Tensor) -> Tensor:
        """The time input the network sees for process time t."""
        return t

    def from_model_time(self, t_model: Tensor) -> Tensor:
        """Inverse of `model_time` (guidance rescale gets the network's t and needs (α, σ))."""
        return t_model

    def for_shape(self, shape: tuple[int, ...]) -> "NoiseProcess":
        """This process for data of `shape` (B, C, H, W): itself, unless it depends on the resolution
        (rectified flow's dynamic shift); the objective and `sample` call it before anything else."""
        return self

    # -- training
    def sample_time(self, batch: int, *, method: str = "uniform", mean: float = 0.0, std: float = 1.0,
                    mode_scale: float = 1.29, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """Training times (B,): `uniform`, `logit_normal` (Esser et al. 2024, §3.1), larger `mean` noisier, or
        SD3's `mode` sampling with `mode_scale` (Esser et al. 2024, eq. 20)."""
        raise NotImplementedError

    def validation_time(self, batch: int, *, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
        """Times (B,) of the validation losses. Every process draws u ~ U[0, 1) from `generator` and validates at
        the SNR of rectified-flow time u, ((1 - u)/u)², so `val/x0_mse` is comparable across processes."""
        return self.sample_time(batch, generator=generator, device=device)

    def time_bucket(self, t: Tensor, buckets: int) -> Tensor:
        """Index in 0..buckets-1 of t on the process's time axis, noisier = higher (validation loss per bucket)."""
        raise NotImplementedError

    # -- sampling
    def sampling_grid(self, steps: int, spacing: str = "trailing", **options: Any) -> list[NoiseLevel]:
        """The `steps + 1` noise levels a sampler visits, from the first model evaluation to clean data."""
        raise NotImplementedError

    def default_spacing(self, sampler: str) -> str:
        """What `spacing="auto"` (the sampler configs' default) means for `sampler` on this process."""
        return "trailing"

    def require_variance_preserving(self, what: str, fix: str) -> None:
        if not self.variance_preserving:
            raise ProcessError(f"{what} is defined for variance-preserving processes (α² + σ² = 1), not for "
                               f"process kind '{self.kind}'. {fix}")

    # -- artifacts
    def to_artifact(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(config with `kind` and parameters, tensors) recorded in an artifact; `process_from_artifact` inverts it."""
        raise NotImplementedError

    @classmethod
    def from_artifact(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> "NoiseProcess":
        raise NotImplementedError


# kind -> "module:Class" (resolved lazily, so adding a process is one line here plus its module)
PROCESS_KINDS: dict[str, str] = {
    "vp_discrete": "ldmkit.diffusion.vp:DiscreteVP",
    "rectified_flow": "ldmkit.diffusion.flow:RectifiedFlow",
}


def process_class(kind: str) -> type[NoiseProcess]:
    if kind not in PROCESS_KINDS:
        raise ProcessError(f"Unknown noise process kind '{kind}'; known kinds: {', '.join(PROCESS_KINDS)}. "
                           "The artifact was written by a newer ldmkit, or its config.json was edited.")
    module, name = PROCESS_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def process_from_artifact(config: dict[str, Any], tensors: dict[str, Tensor]) -> NoiseProcess:
    """Rebuild a process from what `NoiseProcess.to_artifact` wrote (config needs `kind`)."""
    return process_class(config["kind"]).from_artifact(config, tensors)


def sampling_grid(process: NoiseProcess, steps: int, spacing: str = "trailing", **options: Any) -> list[NoiseLevel]:
    """`process.sampling_grid(steps, spacing, **options)` (the samplers' single entry to the grid)."""
    return process.sampling_grid(steps, spacing, **options)


# ---- sampling spacings -----------------------------------------------------------------------


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5: σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, descending (float64)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """σ spaced uniformly in log σ (equivalently in log-SNR), descending (float64)."""
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def beta_sigmas(steps: int, sigma_min: float, sigma_max: float, a: float = 0.6, b: float = 0.6) -> Tensor:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): σ_i = σ_min + F⁻¹_Beta(a,b)(1 - i/(n-1)) (σ_max - σ_min),
    descending (float64): dense at both ends of the range for a, b < 1 (diffusers' `use_beta_sigmas`, a = b = 0.6)."""
    from scipy.stats import beta  # scipy is a dependency of ldmkit; imported here, only where used

    quantiles = 1 - torch.linspace(0, 1, steps, dtype=torch.float64)
    return sigma_min + torch.from_numpy(beta.ppf(quantiles.numpy(), a, b)).to(torch.float64) * (sigma_max - sigma_min)
