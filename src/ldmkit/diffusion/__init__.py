"""Pure-torch diffusion core: schedules, parameterisations, losses, samplers and guidance.

No Lightning, Hydra or W&B here (tests/diffusion/test_layering.py checks it).
"""

from ldmkit.diffusion.guidance import ClassifierFreeGuidance, classifier_free_guidance
from ldmkit.diffusion.losses import DenoisingLoss
from ldmkit.diffusion.samplers import SAMPLERS, nfe
from ldmkit.diffusion.sampling import make_denoiser, sample
from ldmkit.diffusion.schedules import Schedule, make_schedule, q_sample, sampling_grid

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "DenoisingLoss",
    "Schedule",
    "classifier_free_guidance",
    "make_denoiser",
    "make_schedule",
    "nfe",
    "q_sample",
    "sample",
    "sampling_grid",
]
