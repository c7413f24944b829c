"""The former training-loss interface, `DenoisingLoss(...)(model, x0, schedule, cond=, generator=) -> (loss, t)`.

The objective itself is `ldmkit.diffusion.objectives.DenoisingObjective`, the weightings live in
`ldmkit.diffusion.weightings` (re-exported here, where they were defined before).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ldmkit.diffusion.objectives import DenoisingObjective
from ldmkit.diffusion.processes import NoiseProcess
from ldmkit.diffusion.vp import sample_timesteps  # noqa: F401  (its former home)
from ldmkit.diffusion.weightings import (  # noqa: F401
    MIN_SNR_FLOOR_AUTO, SD3_WEIGHTINGS, TIMESTEP_SAMPLINGS, WEIGHTINGS, _check_min_snr, _WEIGHTING_ALIASES,
    loss_weight, resolve_min_snr_floor, sd3_weight, x0_error_scale,
)


@dataclass
class DenoisingLoss:
    """`loss_fn(model, x0, schedule, cond=..., generator=...) -> (per_sample_loss (B,), t (B,))`: the
    former interface of `ldmkit.diffusion.objectives.DenoisingObjective` (which holds the process and
    returns the loss only), kept for callers that pass the schedule per call. Fields as there."""

    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    min_snr_floor: float | str | None = MIN_SNR_FLOOR_AUTO
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    mode_scale: float = 1.29
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    edm_sigma_data: float = 0.5

    def __post_init__(self) -> None:
        self.weighting = self.objective(None).weighting  # validates and resolves aliases

    def objective(self, process: NoiseProcess | None) -> DenoisingObjective:
        return DenoisingObjective(process, **{f.name: getattr(self, f.name) for f in fields(self)})

    def __call__(
        self, model, x0: Tensor, schedule: NoiseProcess, *, cond=None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.objective(schedule).loss_and_time(model, x0, cond, generator)
