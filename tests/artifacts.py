"""Tiny, randomly initialised stage artifacts written through the real export code paths,
so tests of later stages (ldm, eval) run in seconds without training anything."""

from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.artifacts import save_artifact
from ldmkit.nn.autoencoder import AutoencoderConfig, AutoencoderKL

TINY_AE = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, num_groups=8, resolution=32)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=None, head_dim=16, norm_groups=8)


def write_autoencoder(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = AutoencoderConfig(**TINY_AE)
    model = AutoencoderKL(config)
    return save_artifact(folder, "autoencoder", model.state_dict(), {
        "architecture": config.to_dict(), "latent_channels": config.latent_channels,
        "downsampling_factor": config.downsampling_factor, "resolution": 32, "scale_factor": 2.0, "shift_factor": 0.1,
    })


def write_clip(folder: Path, seed: int = 0) -> Path:
    from ldmkit.nn.clip import artifact_config, build_clip

    torch.manual_seed(seed)
    model = build_clip(model_cfg=TINY_CLIP)
    return save_artifact(folder, "clip", model.state_dict(), artifact_config(model))


def ldm_module(autoencoder: Path, text_encoder: Path, prediction: str = "eps", process=None, **kwargs):
    from functools import partial

    from ldmkit.diffusion.objectives import DenoisingObjective
    from ldmkit.diffusion.vp import make_schedule
    from ldmkit.lit.ldm import LatentDiffusionModule
    from ldmkit.nn.backbones import backbone_factory

    kwargs.setdefault("val_prompts", ["a red circle", "a blue square"])
    kwargs.setdefault("sampler", {"name": "ddim", "steps": 3, "guidance_scale": 2.0})
    return LatentDiffusionModule(
        backbone=partial(backbone_factory, "unet", **TINY_UNET), autoencoder=str(autoencoder), text_encoder=str(text_encoder),
        loss=DenoisingObjective(process or make_schedule("scaled_linear", 1000), prediction=prediction),
        optimizer=partial(torch.optim.AdamW, lr=1e-3), **kwargs,
    )


def write_ldm(folder: Path, autoencoder: Path, text_encoder: Path, seed: int = 0, prediction: str = "eps",
              process=None, **kwargs) -> Path:
    torch.manual_seed(seed)
    module = ldm_module(autoencoder, text_encoder, prediction=prediction, process=process, **kwargs)
    # random UNet output layers are zero-initialised: perturb so samples depend on the weights
    with torch.no_grad():
        for p in module.ema.shadow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module.export_artifact(folder)


def write_ldm_v1(folder: Path, module) -> Path:
    """`module`'s EMA weights as an artifact in schema version 1, byte for byte what `export_artifact` wrote
    before the backbone/noise-process contract (ldmkit 771a216: `unet.*` and `schedule.alphas_cumprod`
    tensors, `unet` / `prediction` / `num_timesteps` in config.json)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    unet = module.ema.shadow
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors["schedule.alphas_cumprod"] = module.process.alphas_cumprod.detach().to(torch.float64).contiguous()
    config = {
        "unet": dataclasses.asdict(unet.config),
        "prediction": module.objective.prediction,
        "num_timesteps": module.process.num_timesteps,
        "autoencoder": str(Path(module.hparams.autoencoder).resolve()),
        "text_encoder": str(Path(module.hparams.text_encoder).resolve()),
        "text_encoder_options": {"clip_skip": module.hparams.clip_skip, "model_name": module.hparams.text_encoder_arch},
        "latent": {"channels": module.latent_channels, "downsampling_factor": module.downsampling_factor,
                   "scale_factor": module.scale_factor, "shift_factor": module.shift_factor},
        "resolution": module._resolution(),
        "sampler": module.sampler,
        "global_step": 0,
        "weights": "ema",
    }
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "weights.safetensors"), metadata={"kind": "ldm"})
    meta = {"kind": "ldm", "format_version": 1, **config}
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return folder
