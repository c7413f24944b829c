"""The training objective: `objective(model, x0, cond, generator) -> per-sample loss (B,)`.

edm's `training/loss.py` shape: the objective draws t from the noise process's training distribution,
noises x0 along the process's path, asks `model(x_t, process.model_time(t), cond)` for its raw output
in `prediction` parameterisation and returns the weighted, unreduced squared error; the caller reduces.
No `.item()` or other host syncs: everything stays on x0's device.

Weightings (ldmkit.diffusion.weightings) are weights on the x0-space error ||x̂_0 - x_0||², converted to
the prediction's space, so the same `weighting` means the same objective whatever `prediction` and process
(Hang et al. 2023, §3.3; Kingma & Gao 2023). For variance-preserving processes with eps/v/x0 the VP
closed forms in `loss_weight` are used (unchanged bit for bit); otherwise the conversion factor is the
general `prediction_error_scale` (the squared Jacobian of x̂_0 -> prediction at fixed x_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ldmkit.diffusion.weightings import (
    TIMESTEP_SAMPLINGS, WEIGHTINGS, _WEIGHTING_ALIASES, _check_min_snr, loss_weight, resolve_min_snr_floor,
)
from ldmkit.diffusion.parameterization import (
    DERIVATIVE_PREDICTIONS, PathPoint, check_prediction, path_point, prediction_error_scale, target, to_x0,
)
from ldmkit.diffusion.processes import NoiseProcess

Model = Callable[[Tensor, Tensor, Any], Tensor]


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)  # (B,)


def noise_along_path(point: PathPoint, x0: Tensor, noise: Tensor) -> Tensor:
    """x_t = α x_0 + σ ε with (α, σ) of shape (B,) broadcast over x0 and cast to its dtype."""
    p = path_point(point, x0)
    return p.alpha * x0 + p.sigma * noise


def _has_time_derivatives(process: NoiseProcess) -> bool:
    if process.has_time_derivatives is not None:
        return process.has_time_derivatives
    t = process.sample_time(1, generator=torch.Generator().manual_seed(0))  # a private generator: no global draw
    return process.path(t).d_alpha is not None


def check_process_prediction(process: NoiseProcess, prediction: str) -> None:
    """Fail at construction, with the reason, where a (process, prediction) pair cannot train or sample."""
    if prediction in DERIVATIVE_PREDICTIONS and not _has_time_derivatives(process):
        raise ValueError(
            f"prediction='{prediction}' is the velocity dx_t/dt of a continuous-time path, which process kind "
            f"'{process.kind}' does not define (its discrete timesteps have no α'(t), σ'(t)). Use "
            "process=rectified_flow with prediction=flow, or predict eps / v / x0 on this schedule."
        )
    if prediction == "eps" and process.kind == "rectified_flow":
        raise ValueError(
            "prediction='eps' on process=rectified_flow cannot sample: every flow grid starts at t = 1, pure noise "
            "(α = 0), where an ε-prediction says nothing about x_0 (x_0 = (x_t - t ε)/(1 - t)). "
            "Predict flow (SD3 / Flux), v or x0."
        )


@dataclass
class DenoisingObjective:
    """Denoising score matching on `process` (Ho et al. 2020; Song et al. 2021; Lipman et al. 2023 for `flow`).

    `offset_noise` adds offset · N(0, 1) per (sample, channel) to ε (Guttenberg 2023); it is part of the noise
    the model must predict. `input_perturbation` noises x_t with ε + γ·ξ while the target keeps ε (Ning et al.
    2023, DDPM-IP). `min_snr_floor` floors the x0-space `min_snr` weight (ldmkit.diffusion.weightings; `auto`: 1 on
    zero-terminal-SNR processes, else 0).
    `timestep_sampling` (`uniform`, `logit_normal` with mean/std, `mode` with `mode_scale`: SD3's mode sampling)
    is the training distribution of t, drawn by the process. `edm_sigma_data` is σ_data of the `edm` weighting.
    """

    process: NoiseProcess
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    min_snr_floor: float | str | None = "auto"
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    mode_scale: float = 1.29
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    edm_sigma_data: float = 0.5

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        self.weighting = _WEIGHTING_ALIASES.get(self.weighting, self.weighting)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown loss weighting '{self.weighting}'; choose one of {', '.join(WEIGHTINGS)}.")
        if self.weighting == "min_snr":
            _check_min_snr(self.min_snr_gamma, self.min_snr_floor)
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"Unknown timestep sampling '{self.timestep_sampling}'; choose one of {', '.join(TIMESTEP_SAMPLINGS)}."
            )
        if self.process is not None:
            check_process_prediction(self.process, self.prediction)

    def __call__(self, model: Model, x0: Tensor, cond: Any = None, generator: torch.Generator | None = None) -> Tensor:
        return self.loss_and_time(model, x0, cond, generator)[0]

    def loss_and_time(self, model: Model, x0: Tensor, cond: Any = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(per-sample loss (B,), the process times t (B,) it was drawn at)."""
        if self.weighting not in ("uniform", "min_snr", "snr") and self.prediction == "eps" and self.process.has_zero_terminal_snr:
            raise ValueError(
                f"weighting='{self.weighting}' with prediction='eps' puts infinite weight on the zero-SNR timestep; "
                "use prediction='v' or 'x0' with zero_terminal_snr (Lin et al. 2023 train with v)."
            )
        batch, device = x0.shape[0], x0.device
        process = self.process.for_shape(tuple(x0.shape))
        mode = {"mode_scale": self.mode_scale} if self.timestep_sampling == "mode" else {}
        t = process.sample_time(batch, method=self.timestep_sampling, mean=self.logit_normal_mean,
                                std=self.logit_normal_std, generator=generator, device=device, **mode)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        if self.offset_noise:
            offset_shape = x0.shape[:2] + (1,) * (x0.ndim - 2)  # (B, C, 1, 1)
            noise = noise + self.offset_noise * torch.randn(offset_shape, generator=generator, device=device, dtype=x0.dtype)
        model_noise = noise
        if self.input_perturbation:
            model_noise = noise + self.input_perturbation * torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        point = self.process.path(t)
        x_t = noise_along_path(point, x0, model_noise)
        pred = model(x_t, self.process.model_time(t), cond)
        mse = _per_sample_mse(pred, target(self.prediction, x0, noise, point))
        return mse * self.weight(t, point).to(mse.dtype), t

    def weight(self, t: Tensor, point: PathPoint) -> Tensor:
        """Per-sample weight (B,) on the prediction-space MSE."""
        snr = self.process.snr_at(t)
        floor = resolve_min_snr_floor(self.min_snr_floor, self.process.has_zero_terminal_snr)
        options = {"min_snr_gamma": self.min_snr_gamma, "min_snr_floor": floor, "sigma_data": self.edm_sigma_data}
        if self.process.variance_preserving and self.prediction != "flow":
            return loss_weight(self.weighting, snr, self.prediction, **options)
        if self.weighting == "uniform":
            return torch.ones_like(snr)
        x0_weight = loss_weight(self.weighting, snr, "x0", **options)
        like = torch.empty(snr.shape, dtype=snr.dtype, device=snr.device)
        return x0_weight / prediction_error_scale(self.prediction, point, like)

    @torch.no_grad()
    def validation_losses(self, model: Model, x0: Tensor, cond: Any = None,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(t, unweighted prediction-space MSE, x0-space MSE), each (B,), with t uniform and fixed noise from
        `generator`: the x0-space MSE is comparable across predictions and processes (sweeps): every process draws
        the same reference noise levels, the SNRs of uniform unshifted rectified-flow time
        (`NoiseProcess.validation_time`)."""
        t = self.process.validation_time(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        point = self.process.path(t)
        x_t = noise_along_path(point, x0, noise)
        out = model(x_t, self.process.model_time(t), cond).float()
        loss = _per_sample_mse(out, target(self.prediction, x0.float(), noise.float(), point))
        x0_mse = _per_sample_mse(to_x0(out, x_t.float(), point, self.prediction), x0)
        return t, loss, x0_mse
