"""Loss weightings over SNR, shared by every training objective (ldmkit.diffusion.objectives).

Weightings are defined as a weight on the x0-space error ||x̂_0 - x_0||² and converted to the
chosen prediction's space, so the same `weighting` means the same objective whatever `prediction` is
(Hang et al. 2023, §3.3; Kingma & Gao 2023): with SNR = ᾱ/(1 - ᾱ),
    ||ε̂ - ε||² = SNR ||x̂_0 - x_0||²,   ||v̂ - v||² = (SNR + 1) ||x̂_0 - x_0||².
    uniform   w = 1 on the prediction's own MSE ("simple" loss, Ho et al. 2020) - no conversion.
    min_snr   w_x0 = min(SNR, γ)                     (Hang et al. 2023, eq. 9); for v and x0 predictions
              floored: w_x0 = max(min(SNR, γ), floor), floor = `min_snr_floor` (see below)
    snr       w_x0 = SNR  (= plain ε-MSE for any parameterisation)
    edm       w_x0 = (σ̃² + σ_data²) / (σ̃ σ_data)²  = SNR + 1/σ_data²   (Karras et al. 2022, λ(σ) in Table 1)
    sigma_sqrt, cosmap: SD3's weightings (Esser et al. 2024; diffusers `compute_loss_weighting_for_sd3`) as
              x0-space weights of the rectified-flow time with the same SNR, t = σ/(α + σ) = 1/(1 + sqrt(SNR)):
              sigma_sqrt w_x0 = t^-2, cosmap w_x0 = 2 / (π (1 - 2t + 2t²)). diffusers' SD3 script (default
              `precondition_outputs`) applies them to the x0-space error, so on rectified flow these are its
              objectives for any prediction; sigma_sqrt with prediction=flow is the plain flow-matching MSE.

The min-SNR floor. Unfloored, min-SNR gives a v- or x0-network weight SNR -> 0 as SNR -> 0: on a
zero-terminal-SNR schedule the last timestep, where every trailing sampler makes its first x̂_0 (x̂_0 = -v̂
there), gets exactly zero weight and t >= 900 at most 3e-3 (mean 0.28), so the model is barely trained where
zero terminal SNR was meant to help. Below SNR = `min_snr_floor` the x0-space weight is held at the floor, which
at floor 1 and SNR = 0 is what the plain v-loss gives (w_x0 = SNR + 1; Lin et al. 2023 train zero-SNR models
with it); diffusers' training examples floor the velocity objective the same way. At SNR >= floor it is Hang
et al. unchanged. The default `auto` is 1 on processes with zero terminal SNR (zero_terminal_snr=true, rectified
flow) and 0 elsewhere, so schedules that never reach SNR = 0 keep Hang et al. exactly; a number is used as given
(`min_snr_floor=0` is Hang et al. everywhere). eps-prediction keeps min(SNR, γ)/SNR (-> 1, its plain loss): a
floor there would be an infinite ε-weight at SNR = 0, where ε̂ says nothing about x_0 anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldmkit.diffusion.parameterization import check_prediction

SD3_WEIGHTINGS = ("sigma_sqrt", "cosmap")
WEIGHTINGS = ("uniform", "min_snr", "snr", "edm") + SD3_WEIGHTINGS
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
_WEIGHTING_ALIASES = {"simple": "uniform", "min_snr_gamma": "min_snr"}


def x0_error_scale(snr: Tensor, prediction: str) -> Tensor:
    """c(SNR) with ||pred error||² = c · ||x0 error||² for the given parameterisation."""
    if prediction == "eps":
        return snr
    if prediction == "v":
        return snr + 1
    check_prediction(prediction)
    return torch.ones_like(snr)


def sd3_weight(weighting: str, flow_t: Tensor) -> Tensor:
    """diffusers' `compute_loss_weighting_for_sd3` at rectified-flow times (sigmas) t: `sigma_sqrt` t^-2,
    `cosmap` 2 / (π (1 - 2t + 2t²)), anything else 1."""
    if weighting == "sigma_sqrt":
        return flow_t ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * flow_t + 2 * flow_t**2))
    return torch.ones_like(flow_t)


def flow_time_from_snr(snr: Tensor) -> Tensor:
    """The rectified-flow time with the same SNR: (1 - t)/t = sqrt(SNR)."""
    return 1 / (1 + snr.sqrt())


def loss_weight(
    weighting: str, snr: Tensor, prediction: str, *, min_snr_gamma: float = 5.0, min_snr_floor: float = 0.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """Weight on the prediction-space MSE so that the objective is `weighting` (see module docstring).
    SNR = 0 (zero-terminal-SNR timestep) gets the limit value where it is finite. `min_snr_floor` is a number
    here (0: Hang et al.); `resolve_min_snr_floor` turns the objectives' `auto` into one."""
    weighting = _WEIGHTING_ALIASES.get(weighting, weighting)
    check_prediction(prediction)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting in SD3_WEIGHTINGS:
        return sd3_weight(weighting, flow_time_from_snr(snr)) / x0_error_scale(snr, prediction)
    if weighting == "min_snr":
        _check_min_snr(min_snr_gamma, min_snr_floor)
        if prediction == "eps":  # min(SNR, γ)/SNR written so that SNR = 0 gives its limit 1
            return (min_snr_gamma / snr).clamp(max=1.0)
        return snr.clamp(min=min_snr_floor, max=min_snr_gamma) / x0_error_scale(snr, prediction)
    if weighting == "snr":
        if prediction == "eps":
            return torch.ones_like(snr)
        return snr / x0_error_scale(snr, prediction)
    if weighting == "edm":
        if prediction == "eps":
            return 1 + 1 / (sigma_data**2 * snr)
        return (snr + 1 / sigma_data**2) / x0_error_scale(snr, prediction)
    raise ValueError(f"Unknown loss weighting '{weighting}'; choose one of {', '.join(WEIGHTINGS)}.")


MIN_SNR_FLOOR_AUTO = "auto"


def resolve_min_snr_floor(floor: float | str | None, zero_terminal_snr: bool) -> float:
    """`auto` (or None): 1 where the process reaches SNR = 0, else 0 (Hang et al. exactly); numbers as given."""
    if floor is None or floor == MIN_SNR_FLOOR_AUTO:
        return 1.0 if zero_terminal_snr else 0.0
    return float(floor)


def _check_min_snr(gamma: float, floor: float | str | None) -> None:
    if floor is None or floor == MIN_SNR_FLOOR_AUTO:
        return
    if isinstance(floor, str) or not 0 <= floor <= gamma:
        raise ValueError(f"min_snr_floor must be 'auto' or lie in [0, min_snr_gamma={gamma}], got {floor!r}; "
                         "'auto' (the default) is 1 on zero-terminal-SNR processes (keeps the zero-SNR timestep "
                         "trained) and 0 elsewhere, 0 is Hang et al. 2023 exactly.")
