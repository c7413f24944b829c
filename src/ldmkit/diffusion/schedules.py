"""Former home of the discrete schedules, kept so `from ldmkit.diffusion.schedules import ...` keeps working.
The code lives in ldmkit.diffusion.processes (the contract) and ldmkit.diffusion.vp (the VP schedules)."""

from ldmkit.diffusion.processes import (  # noqa: F401
    SIGMA_SPACINGS, SPACINGS, TIMESTEP_SPACINGS, NoiseLevel, NoiseProcess, exponential_sigmas, karras_sigmas,
    sampling_grid,
)
from ldmkit.diffusion.vp import (  # noqa: F401
    SCHEDULES, ZERO_SNR_ALPHA_BAR, DiscreteVP, Schedule, make_schedule, q_sample, rescale_zero_terminal_snr,
    sample_timesteps, timestep_spacing,
)
