"""Text → image with a trained latent diffusion model (pure torch; no Lightning).

Shared by the LDM's validation sampling, `eval.py` sampled sets and `eval.py task=txt2img`,
so all three draw the same images for the same prompt, seed and settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ldmkit.artifacts import ArtifactError, load_artifact, weights_hash
from ldmkit.diffusion import classifier_free_guidance, sample
from ldmkit.diffusion.schedules import Schedule


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise with one generator per sample, so a sample's noise does not depend on the
    batch it is drawn in (EDM `generate.py`, StackedRandomGenerator). (B, *shape)"""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device, dtype)


def fresh_noise_seed(seed: int) -> int:
    """Seed of sample `seed`'s generator for the fresh noise of ancestral/SDE samplers. Mixed
    (SplitMix64 finaliser) so that stream is not the initial-noise stream of `seed` (or of a
    neighbouring seed): torch's CPU generator seeded with s would replay seeded_noise([s])."""
    x = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def per_sample_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample for the samplers' fresh noise, so stochastic samplers (euler_a,
    ddpm, dpmpp_2m_sde, ddim with eta > 0) also draw a sample's image independently of its batch."""
    return [torch.Generator(device).manual_seed(fresh_noise_seed(s)) for s in seeds]


@dataclass
class TextToImage:
    """The three frozen pieces plus the facts that tie them together."""

    unet: nn.Module
    autoencoder: nn.Module
    text_encoder: nn.Module
    schedule: Schedule
    prediction: str
    scale_factor: float
    shift_factor: float
    latent_channels: int
    downsampling_factor: int
    resolution: int = 32  # the image size it was trained at (the default for generate)
    model_hash: str = ""
    name: str = "ldm"

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(list(prompts))  # (B, L, D), (B, P)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) → normalised latents (B, C, H/f, W/f)."""
        latents = self.autoencoder.encode(images).sample(generator=generator)
        return (latents - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.scale_factor + self.shift_factor).clamp(-1, 1)

    def denoiser(self, context: torch.Tensor, pooled: torch.Tensor) -> Callable:
        def model(x_t: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.unet(x_t, t, context=cond[0], pooled=cond[1])

        return model

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        negative_prompts: Sequence[str] | None = None,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance_scale: float = 4.0,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        callback: Callable | None = None,
        generator: torch.Generator | None = None,
        **sampler_options: Any,
    ) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, height, width). Sample i depends only on prompts[i], seeds[i] and the
        settings, not on the batch: its initial noise is seeded by seeds[i] and, unless `generator` is
        given, so is the stochastic samplers' fresh noise (`per_sample_generators`).
        `callback(i, n, x, x0)` runs after each sampler step (e.g. a progress bar)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
        height, width = height or self.resolution, width or self.resolution
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width} must be multiples of the autoencoder's downsampling factor {f}.")
        device = self.device
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        context, pooled = self.encode_text(prompts)
        uncond = self.encode_text(negative_prompts)
        denoiser = classifier_free_guidance(self.denoiser(context, pooled), (context, pooled), uncond, guidance_scale, rescale=guidance_rescale)
        noise = seeded_noise(seeds, (self.latent_channels, height // f, width // f), device)
        if generator is None:  # ancestral/SDE samplers draw fresh noise: per sample, from its seed
            generator = per_sample_generators(seeds, device)
        latents = sample(denoiser, noise, self.schedule, sampler=sampler, steps=steps, prediction=self.prediction,
                         generator=generator, callback=callback, **sampler_options)
        return self.decode_latents(latents)


def ldm_artifact_config(unet_config: dict, schedule: Schedule, prediction: str, autoencoder: str, text_encoder: str,
                        text_encoder_options: dict, latent: dict, **extra: Any) -> dict[str, Any]:
    """The config.json of an `ldm` artifact: everything needed to rebuild the generator."""
    return {
        "unet": unet_config,
        "prediction": prediction,
        "num_timesteps": schedule.num_timesteps,
        "autoencoder": str(Path(autoencoder).resolve()),
        "text_encoder": str(Path(text_encoder).resolve()),
        "text_encoder_options": text_encoder_options,
        "latent": latent,
        **extra,
    }


def load_text_to_image(folder: str | os.PathLike, device: str | torch.device = "cpu") -> TextToImage:
    """Rebuild the generator from an `ldm` artifact folder and the artifacts it references."""
    from ldmkit.nn.autoencoder import load_autoencoder
    from ldmkit.nn.clip import load_text_encoder
    from ldmkit.nn.unet import UNet, UNetConfig

    tensors, config = load_artifact(folder, "ldm")
    for key in ("autoencoder", "text_encoder"):
        if not Path(config[key]).exists():
            raise ArtifactError(
                f"The ldm artifact '{folder}' references its {key} at '{config[key]}', which no longer exists. "
                f"Copy that folder back, or edit '{key}' in {Path(folder) / 'config.json'} to point at it."
            )
    autoencoder, scale, shift, ae_config = load_autoencoder(config["autoencoder"], device=device)
    text_encoder = load_text_encoder(config["text_encoder"], **config.get("text_encoder_options", {})).to(device)
    unet = UNet(UNetConfig(**config["unet"]))
    unet_state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    unet.load_state_dict(unet_state)
    unet.to(device).eval().requires_grad_(False)
    schedule = Schedule(alphas_cumprod=tensors["schedule.alphas_cumprod"].to(torch.float64))
    latent = config["latent"]
    return TextToImage(
        unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, schedule=schedule,
        prediction=config["prediction"], scale_factor=scale, shift_factor=shift,
        latent_channels=latent["channels"], downsampling_factor=latent["downsampling_factor"],
        resolution=int(config.get("resolution", 8 * latent["downsampling_factor"])), model_hash=weights_hash(folder), name=Path(folder).resolve().parent.name,
    )
