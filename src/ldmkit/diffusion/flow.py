"""Rectified flow (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024 "SD3") as a `NoiseProcess`.

x_t = (1 - t) x_0 + t ε on continuous t ∈ [0, 1] (t = 1 is pure noise): α = 1 - t, σ = t, α' = -1, σ' = 1,
so the `flow` prediction is the velocity u = dx_t/dt = ε - x_0 (ldmkit.diffusion.parameterization).

Conventions, chosen to match diffusers' FlowMatchEulerDiscreteScheduler and the SD3 / Flux pipelines:
- The network's time input is 1000·t (`num_train_timesteps` · t), what diffusers hands SD3/Flux transformers
  (its `timesteps = sigmas * num_train_timesteps`), so a VP-trained backbone sees the same [0, 1000] range.
- Time shift (Esser et al. 2024, §5.3.2): static `shift` s maps t -> s t / (1 + (s - 1) t) (SD3: s = 3);
  `dynamic_shift` (Flux) maps t -> e^μ / (e^μ + (1/t - 1)) with μ linear in the image's token count,
  `base_shift`@`base_seq_len` -> `max_shift`@`max_seq_len` (diffusers `calculate_shift`); tokens =
  (latent H / `patch_size`) · (latent W / `patch_size`), read from the latent shape (`for_shape`) or given as
  `image_seq_len`. The shift applies to the sampling grid and, with `train_shift` (default), to training
  times (diffusers' SD3 script trains on shifted times; its Flux script on unshifted ones: `train_shift=false`).
- Sampling grid (`trailing` = `linspace`, the default): diffusers' own, linspace(1, t_end, steps) in
  unshifted time, then shifted, then t = 0. t_end is diffusers' `sigma_min`: 1/1000, itself statically
  shifted for static shift (so the end point is shifted twice, as in diffusers; 1/1000 with dynamic shift).
  `karras` (ρ = `rho`), `exponential` (uniform in log t) and `beta` (Beta(0.6, 0.6) quantiles) place the steps
  between that grid's end points (or `sigma_min` / `sigma_max`, in t: σ = t on this path) instead, as diffusers'
  `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` do: the shift then moves only the end
  points. `leading` (a discrete-timestep spacing) and `steps_offset` are VP-only.
- `flow_sigmas`: the grid of diffusers' multistep solvers with `use_flow_sigmas=True` (DPMSolverMultistep,
  UniPCMultistep): t_j = shift(j/N · (1 - 1/1000)) for j = N, ..., 1, then t = 0. It has no 1/1000 stop before
  t = 0, which the Euler grid spends a whole step on: a multistep solver in λ then extrapolates its last real step
  (0.33 -> 0.001 at 4 steps: h = 6.2 against h_prev = 1.4, a 2.2x extrapolation). Use it for dpmpp_2m / unipc on
  flow models at few steps: at 4 steps on a logit-normal flow model on `shapes`, 81.5% colour+shape against
  19.4% on the Euler grid (BENCHMARKS.md, "Noise process and backbone on `shapes`"). `spacing="auto"` (the
  sampler configs' default) picks it for dpmpp_2m, dpmpp_2m_sde and unipc, and `trailing` for the others.
- Training times: `uniform`, `logit_normal` (SD3 §3.1, t = sigmoid(N(m, s²))) and SD3's `mode`
  (t = 1 - u - scale·(cos²(πu/2) - 1 + u)), as diffusers' `compute_density_for_timestep_sampling`, but continuous
  (diffusers rounds to its 1000 levels), clamped to [1e-5, 1] so the SNR stays finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ldmkit.diffusion.parameterization import PathPoint
from ldmkit.diffusion.processes import (
    TIME_SAMPLINGS, NoiseLevel, NoiseProcess, ProcessError, beta_sigmas, exponential_sigmas, karras_sigmas,
)

T_MIN = 1e-5  # training times are clamped to [T_MIN, 1]
T_SPACINGS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}  # between end points
FLOW_SPACINGS = ("trailing", "linspace", "flow_sigmas", *T_SPACINGS)
# multistep solvers in λ that diffusers runs on flow models with use_flow_sigmas: spacing="auto" gives them that grid
FLOW_SIGMA_SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")


def static_shift(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3's time shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23 with s = sqrt(m/n))."""
    return shift * t / (1 + (shift - 1) * t)


def dynamic_shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                     base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """Flux's μ: linear in the token count through (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def exponential_time_shift(t: Tensor, mu: float) -> Tensor:
    """Flux's shift t' = e^μ / (e^μ + (1/t - 1)) (= static_shift with s = e^μ); t = 0 stays 0."""
    return static_shift(t, math.exp(mu))


def mode_density_time(u: Tensor, scale: float) -> Tensor:
    """SD3's mode sampling (Esser et al. 2024, eq. 20): f(u) = 1 - u - scale·(cos²(πu/2) - 1 + u)."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


@dataclass(frozen=True)
class RectifiedFlow(NoiseProcess):
    """x_t = (1 - t) x_0 + t ε, t ∈ [0, 1], with optional SD3 / Flux time shift (see the module docstring)."""

    kind: ClassVar[str] = "rectified_flow"
    variance_preserving: ClassVar[bool] = False
    ode_in_process_time: ClassVar[bool] = True  # Heun integrates dx/dt = u in t (diffusers FlowMatchHeun)
    has_time_derivatives: ClassVar[bool] = True
    grid_options: ClassVar[tuple[str, ...]] = ("image_seq_len", "sigma_min", "sigma_max", "rho")

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch_size: int = 2
    image_seq_len: int | None = None
    train_shift: bool = True

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"rectified_flow shift must be > 0 (1 = no shift, SD3 uses 3.0), got {self.shift}.")
        if self.dynamic_shift and self.shift != 1.0:
            raise ValueError(f"rectified_flow: set either shift (static, SD3) or dynamic_shift (Flux), not both; "
                             f"got shift={self.shift} with dynamic_shift=true.")
        if self.num_train_timesteps < 1 or self.patch_size < 1 or self.max_seq_len <= self.base_seq_len:
            raise ValueError("rectified_flow needs num_train_timesteps >= 1, patch_size >= 1 and "
                             f"max_seq_len > base_seq_len; got {self.num_train_timesteps}, {self.patch_size}, "
                             f"{self.max_seq_len} <= {self.base_seq_len}.")

    # -- the path: α = 1 - t, σ = t
    def path(self, t: Tensor) -> PathPoint:
        t = torch.as_tensor(t)
        t = t.to(torch.float32 if t.device.type == "mps" else torch.float64)
        return PathPoint(1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t))

    @property
    def has_zero_terminal_snr(self) -> bool:
        return True  # t = 1 is pure noise

    def model_time(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def from_model_time(self, t_model: Tensor) -> Tensor:
        return t_model / self.num_train_timesteps

    # -- the shift
    def for_shape(self, shape: tuple[int, ...]) -> "RectifiedFlow":
        """With dynamic shift and no fixed `image_seq_len`: this process for latents of `shape` (B, C, H, W)."""
        if not self.dynamic_shift or self.image_seq_len is not None or len(shape) < 4:
            return self
        return replace(self, image_seq_len=(shape[-2] // self.patch_size) * (shape[-1] // self.patch_size))

    def mu(self, image_seq_len: int | None = None) -> float:
        tokens = self.image_seq_len if image_seq_len is None else image_seq_len
        if tokens is None:
            raise ProcessError("rectified_flow with dynamic_shift needs the image's token count: pass latents through "
                               "ldmkit.diffusion.sample (it reads their shape) or set process.image_seq_len.")
        return dynamic_shift_mu(int(tokens), self.base_shift, self.max_shift, self.base_seq_len, self.max_seq_len)

    def apply_shift(self, t: Tensor, image_seq_len: int | None = None) -> Tensor:
        """t -> shifted t (static or dynamic; the identity when neither is set)."""
        if self.dynamic_shift:
            return exponential_time_shift(t, self.mu(image_seq_len))
        return t if self.shift == 1.0 else static_shift(t, self.shift)

    # -- training
    def sample_time(self, batch: int, *, method: str = "uniform", mean: float = 0.0, std: float = 1.0,
                    mode_scale: float = 1.29, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """Training times (B,) float32 in [T_MIN, 1]: `uniform`, `logit_normal`(mean, std), `mode`(mode_scale),
        the same draws as diffusers' `compute_density_for_timestep_sampling`, then shifted if `train_shift`."""
        if method == "logit_normal":
            u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
        elif method in ("uniform", "mode"):
            u = torch.rand(batch, generator=generator, device=device)
            u = mode_density_time(u, mode_scale) if method == "mode" else u
        else:
            raise ValueError(f"Unknown timestep sampling '{method}'; choose one of {', '.join(TIME_SAMPLINGS)}.")
        t = self.apply_shift(u) if self.train_shift else u
        return t.clamp(T_MIN, 1.0)

    def validation_time(self, batch: int, *, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
        """Uniform, unshifted t: the reference noise levels of every process (`NoiseProcess.validation_time`), so the
        validation metrics compare runs with different shifts, and VP runs, on one footing."""
        return torch.rand(batch, generator=generator, device=device).clamp(T_MIN, 1.0)

    def time_bucket(self, t: Tensor, buckets: int) -> Tensor:
        return (t * buckets).long().clamp(0, buckets - 1)

    # -- sampling
    def sampling_grid(self, steps: int, spacing: str = "trailing", *, image_seq_len: int | None = None,
                      sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
                      **unknown: Any) -> list[NoiseLevel]:
        """`steps + 1` levels ending at t = 0: diffusers' FlowMatchEulerDiscreteScheduler grid, or its karras /
        exponential / beta variants between that grid's end points (module docstring)."""
        if unknown:
            raise ProcessError(f"rectified_flow sampling grids take no option(s) {sorted(unknown)} (those are for "
                               "discrete VP schedules); drop them from the sampler config.")
        if spacing not in FLOW_SPACINGS:
            raise ProcessError(f"rectified_flow has no spacing '{spacing}' (a discrete-timestep spacing of VP "
                               f"schedules); choose one of {', '.join(FLOW_SPACINGS)} (trailing = linspace here: "
                               "diffusers' flow-matching grid).")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if spacing == "flow_sigmas":  # diffusers' use_flow_sigmas: (j/N)(1 - 1/1000), j = N..1, shifted; then 0
            unshifted = torch.arange(steps, 0, -1, dtype=torch.float64) / steps * (1.0 - 1.0 / self.num_train_timesteps)
        else:
            t_end = 1.0 / self.num_train_timesteps
            if not self.dynamic_shift:
                t_end = float(self.apply_shift(torch.tensor(t_end, dtype=torch.float64)))  # diffusers' sigma_min
            unshifted = torch.linspace(1.0, t_end, steps, dtype=torch.float64)
        ts = self.apply_shift(unshifted, image_seq_len)
        if spacing in T_SPACINGS:
            ts = self._spaced(spacing, steps, float(ts[-1]), float(ts[0]), sigma_min, sigma_max, rho)
        elif sigma_min is not None or sigma_max is not None or rho is not None:
            raise ProcessError(f"sigma_min / sigma_max / rho apply to spacing {', '.join(T_SPACINGS)} (rho to karras "
                               f"only), not to spacing='{spacing}'; drop them or pick one of those spacings.")
        levels = [NoiseLevel.from_alpha_sigma(t, 1.0 - t, t, -1.0, 1.0) for t in ts.tolist()]
        return levels + [NoiseLevel.from_alpha_sigma(0.0, 1.0, 0.0, -1.0, 1.0)]

    def default_spacing(self, sampler: str) -> str:
        """`auto`: flow_sigmas for the multistep solvers in λ (as diffusers' DPMSolverMultistep / UniPC with
        use_flow_sigmas), trailing (FlowMatchEuler's grid) for the rest."""
        return "flow_sigmas" if sampler in FLOW_SIGMA_SAMPLERS else "trailing"

    @staticmethod
    def _spaced(spacing: str, steps: int, lo: float, hi: float, sigma_min: float | None, sigma_max: float | None,
                rho: float | None) -> Tensor:
        """`steps` times from `hi` down to `lo` (or sigma_max / sigma_min: t on this path) by `spacing`."""
        lo = lo if sigma_min is None else float(sigma_min)
        hi = hi if sigma_max is None else float(sigma_max)
        if not (0 < lo <= hi <= 1 and (lo < hi or steps == 1)):
            raise ProcessError(f"spacing='{spacing}' on rectified_flow needs 0 < sigma_min < sigma_max <= 1 (times t, "
                               f"σ = t on this path; default: the shifted grid's end points), got {lo} and {hi}.")
        if spacing == "karras":
            return karras_sigmas(steps, lo, hi, 7.0 if rho is None else float(rho))
        if rho is not None:
            raise ProcessError(f"rho shapes the karras spacing only, not spacing='{spacing}'; drop it.")
        return T_SPACINGS[spacing](steps, lo, hi)

    # -- artifacts
    def to_artifact(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        fields = ("num_train_timesteps", "shift", "dynamic_shift", "base_shift", "max_shift", "base_seq_len",
                  "max_seq_len", "patch_size", "image_seq_len", "train_shift")
        return {"kind": self.kind, **{name: getattr(self, name) for name in fields}}, {}

    @classmethod
    def from_artifact(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> "RectifiedFlow":
        return cls(**{k: v for k, v in config.items() if k not in ("kind", "prediction")})
