"""Pure-torch diffusion core: noise processes, parameterisations, objectives, samplers and guidance.

No Lightning, Hydra or W&B here (tests/diffusion/test_layering.py checks it).
"""

from ldmkit.diffusion.guidance import ClassifierFreeGuidance, classifier_free_guidance
from ldmkit.diffusion.losses import DenoisingLoss
from ldmkit.diffusion.objectives import DenoisingObjective
from ldmkit.diffusion.processes import NoiseLevel, NoiseProcess, process_from_artifact, sampling_grid
from ldmkit.diffusion.samplers import SAMPLERS, nfe
from ldmkit.diffusion.sampling import make_denoiser, sample
from ldmkit.diffusion.vp import DiscreteVP, Schedule, make_schedule, q_sample

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "DenoisingLoss",
    "DenoisingObjective",
    "DiscreteVP",
    "NoiseLevel",
    "NoiseProcess",
    "Schedule",
    "classifier_free_guidance",
    "make_denoiser",
    "make_schedule",
    "nfe",
    "process_from_artifact",
    "q_sample",
    "sample",
    "sampling_grid",
]
