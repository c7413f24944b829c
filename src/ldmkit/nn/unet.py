"""Former home of the UNet: kept importable as a thin re-export of ldmkit.nn.backbones.unet."""

from ldmkit.nn.backbones.unet import (  # noqa: F401
    UNET_PRESETS, TimestepMLP, UNet, UNetConfig, UNetLevel, diffusers_unet_kwargs, state_dict_from_diffusers,
    timestep_embedding, unet_from_preset,
)
