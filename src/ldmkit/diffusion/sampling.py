"""The public sampling entry: a raw eps/v/x0/flow network and a noise process in, clean samples out."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.parameterization import check_prediction, to_x0
from ldmkit.diffusion.samplers import SAMPLERS, Callback, Denoiser, Generator
from ldmkit.diffusion.processes import NoiseLevel, NoiseProcess, sampling_grid

Model = Callable[[Tensor, Tensor], Tensor]


def make_denoiser(model: Model, prediction: str = "eps", process: NoiseProcess | None = None) -> Denoiser:
    """The samplers' denoiser `(x, level) -> x̂_0` from `model(x_t, t) -> raw output`, where t (float (B,)) is
    `process.model_time(level.t)` (level.t itself without a process)."""
    check_prediction(prediction)

    def denoiser(x: Tensor, level: NoiseLevel) -> Tensor:
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.full((x.shape[0],), level.t, device=x.device, dtype=t_dtype)
        if process is not None:
            t = process.model_time(t)
        # the sampler state keeps the noise's dtype, whatever precision the network answers in
        return to_x0(model(x, t).to(x.dtype), x, level, prediction)

    return denoiser


def sample(
    model: Model,
    noise: Tensor,
    schedule: NoiseProcess,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    *,
    prediction: str = "eps",
    spacing: str = "auto",
    generator: Generator = None,
    callback: Callback | None = None,
    **options: Any,
) -> Tensor:
    """Draw samples x_0 from `model`, starting at unit-variance `noise` (B, ...).

    model:      `model(x_t, t) -> raw output` in `prediction` parameterisation (`eps`, `v`, `x0`, `flow`);
                x_t = α x_0 + σ ε on the process's path, t = `schedule.model_time(level.t)` a float tensor (B,)
                (for discrete VP schedules the timesteps, fractional between grid points of sigma spacings).
                Bind conditioning in a closure or with `classifier_free_guidance` (its guidance rescale gets
                the process and `prediction` from here).
    schedule:   the noise process (any `NoiseProcess`; the discrete VP schedules are `make_schedule(...)`).
    noise:      N(0, I); it is x_T for every sampler, so the same noise gives paired comparisons across samplers.
    sampler:    a key of `SAMPLERS`: ddpm, ddim, plms, dpmpp_2m, dpmpp_2m_sde, unipc, euler, euler_a, heun, lms.
    spacing:    the grid: `auto` (default: the process's `default_spacing(sampler)`: `trailing` on VP schedules;
                on rectified flow `flow_sigmas` for dpmpp_2m / dpmpp_2m_sde / unipc, `trailing` for the others),
                `trailing` (starts at t = T-1, required for zero-terminal-SNR schedules, Lin et al. 2023),
                `leading`, `linspace`, `karras`, `exponential`; on rectified flow `trailing` (= `linspace`,
                FlowMatchEuler's grid), `flow_sigmas`, `karras`, `exponential`, `beta` (its module docstring).
    generator:  torch.Generator (or one per sample) for the stochastic samplers' fresh noise.
    callback:   `callback(i, n, x, x0)` after step i of n with the new x and that step's x̂_0.
    options:    sampler options (`eta` for ddim / euler_a / dpmpp_2m_sde, `order` for lms / unipc,
                `variant`/`corrector` for unipc) and grid options (`sigma_min`, `sigma_max`, `rho`,
                `steps_offset`). Options set to None are ignored, so uniform sampler configs may carry `eta: null`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    check_prediction(prediction)
    options = {k: v for k, v in options.items() if v is not None}
    schedule = schedule.for_shape(tuple(noise.shape))  # e.g. rectified flow's resolution-dependent shift
    if spacing == "auto":
        spacing = schedule.default_spacing(sampler)
    grid_keys = schedule.grid_options
    first = sampling_grid(schedule, steps, spacing, **{k: v for k, v in options.items() if k in grid_keys})[0]
    if prediction == "eps" and first.alpha == 0 and not schedule.variance_preserving:
        raise ValueError(f"prediction='eps' cannot sample process kind '{schedule.kind}': its grid starts at pure "
                         "noise (α = 0), where an eps-prediction says nothing about x_0. Predict flow, v or x0.")
    if prediction == "eps" and first.alpha == 0:
        raise ValueError(
            "This schedule has zero terminal SNR and the grid starts at it, where an eps-prediction says nothing "
            "about x_0 (x_0 = (x - ε)/0). Train with prediction='v' or 'x0' (Lin et al. 2023), or sample with "
            "spacing='leading'."
        )
    if isinstance(model, ClassifierFreeGuidance):
        model = model.bind(schedule, prediction)
    denoiser = make_denoiser(model, prediction, schedule)
    return SAMPLERS[sampler](denoiser, noise, schedule, steps, generator=generator, callback=callback,
                             spacing=spacing, **options)
