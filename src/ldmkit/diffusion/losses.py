"""The former training-loss interface, `DenoisingLoss(...)(model, x0, schedule, cond=, generator=) -> (loss, t)`.

The objective itself is `ldmkit.diffusion.objectives.DenoisingObjective`, the weightings live in
`ldmkit.diffusion.weightings` (re-exported here, where they were defined before).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ldmkit.diffusion.objectives import DenoisingObjective
from ldmkit.diffusion.processes import NoiseProcess
from ldmkit.diffusion.vp import sample_timesteps  # noqa: F401  (its former home)
from ldmkit.diffusion.weightings import (  # noqa: F401
    MIN_SNR_FLOOR_AUTO, SD3_WEIGHTINGS, TIMESTEP_SAMPLINGS, WEIGHTINGS, _check_min_snr, _WEIGHTING_ALIASES,
    loss_weight, resolve_min_snr_floor, sd3_weight, x0_error_scale,
)


class DenoisingLoss:
    """`loss_fn(model, x0, schedule, cond=..., generator=...) -> (per_sample_loss (B,), t (B,))`: the
    former interface of `DenoisingObjective` (which holds the process and returns the loss only), kept for
    callers that pass the schedule per call. Keyword arguments, defaults and checks are the objective's
    (one copy of the fields); they read as attributes, e.g. `DenoisingLoss(weighting="simple").weighting`."""

    def __init__(self, **settings: Any) -> None:
        self.settings = DenoisingObjective(None, **settings)  # validates, resolves weighting aliases

    def __getattr__(self, name: str) -> Any:
        if name == "settings":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.settings, name)

    def __repr__(self) -> str:
        return repr(self.settings).replace("DenoisingObjective(process=None, ", "DenoisingLoss(", 1)

    def objective(self, process: NoiseProcess | None) -> DenoisingObjective:
        return replace(self.settings, process=process)

    def __call__(
        self, model, x0: Tensor, schedule: NoiseProcess, *, cond=None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.objective(schedule).loss_and_time(model, x0, cond, generator)
