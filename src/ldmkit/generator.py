"""Text -> image with a trained latent diffusion model (pure torch; no Lightning).

`TextToImage` is the one generator: the LDM's validation sampling, `eval.py` sampled sets and
`eval.py task=txt2img` all draw through it, and training and sampling run the backbone through the
one `BackboneDenoiser`, so all of them see the same images for the same prompt, seed and settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldmkit.artifacts import ArtifactError, load_artifact, read_artifact_config, read_ldm_artifact, weights_hash
from ldmkit.diffusion import classifier_free_guidance, sample
from ldmkit.diffusion.processes import NoiseProcess
from ldmkit.nn.frozen import FrozenEncoders, select_text_context

# keys of a sampler config (conf/sampler/*.yaml) that are not sampler options
_SAMPLER_SETTINGS = ("name", "steps", "guidance_scale", "guidance_rescale")


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


def sampler_kwargs(sampler: Mapping[str, Any]) -> dict[str, Any]:
    """`generate` keywords from a whole sampler config (conf/sampler/*.yaml): name, steps, guidance and every
    other key (spacing, eta, grid options such as rho or sigma_max, order, ...) as a sampler option."""
    if "name" not in sampler or "steps" not in sampler:
        raise ValueError(f"a sampler config needs `name` and `steps` (conf/sampler/*.yaml), got {dict(sampler)}.")
    options = {k: v for k, v in sampler.items() if k not in _SAMPLER_SETTINGS and v is not None}
    return {
        "sampler": str(sampler["name"]), "steps": int(sampler["steps"]),
        "guidance_scale": float(sampler.get("guidance_scale", 1.0)),
        "guidance_rescale": float(sampler.get("guidance_rescale") or 0.0), **options,
    }


@dataclass
class BackboneDenoiser:
    """`model(x_t, t, cond) -> raw prediction` over a backbone, cond = (context, pooled): the network call
    shared by the training objective, validation and sampling. `pooled` reaches the backbone only when it
    was built to take one (`use_pooled`)."""

    backbone: Callable[..., torch.Tensor]
    use_pooled: bool
    text_context: str = "tokens"  # what the backbone attends to (ldmkit.nn.frozen.TEXT_CONTEXTS)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        context = select_text_context(cond[0], cond[1], self.text_context)
        return self.backbone(x_t, t, context=context, pooled=cond[1] if self.use_pooled else None)


@dataclass
class TextToImage:
    """The backbone, the frozen encoders, the noise process and the facts that tie them together."""

    backbone: nn.Module
    frozen: FrozenEncoders
    process: NoiseProcess
    prediction: str
    resolution: int = 32  # the image size it was trained at (the default for generate)
    model_hash: str = ""
    name: str = "ldm"
    text_context: str = "tokens"  # what the backbone attends to: the artifact's text_encoder_options["context"]

    # ---- what callers read ------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        """The backbone (its name when only UNets existed)."""
        return self.backbone

    @property
    def schedule(self) -> NoiseProcess:
        """The noise process (its name when only discrete VP schedules existed)."""
        return self.process

    @property
    def autoencoder(self) -> nn.Module:
        return self.frozen.autoencoder

    @property
    def text_encoder(self) -> nn.Module:
        return self.frozen.text_encoder

    @property
    def scale_factor(self) -> float:
        return self.frozen.scale_factor

    @property
    def shift_factor(self) -> float:
        return self.frozen.shift_factor

    @property
    def latent_channels(self) -> int:
        return self.frozen.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.frozen.downsampling_factor

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ---- pieces -----------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frozen.encode_text(prompts)  # (B, L, D), (B, P)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) → normalised latents (B, C, H/f, W/f)."""
        return self.frozen.encode_images(images, generator)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.frozen.decode(latents)

    def denoiser(self, *_: Any) -> BackboneDenoiser:
        return BackboneDenoiser(self.backbone, self.backbone.pooled_dim is not None, self.text_context)

    # ---- sampling ---------------------------------------------------------------------------
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
        latent = self.frozen.latent_spec(height or self.resolution, width or self.resolution)
        device = self.device
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        cond = self.encode_text(prompts)
        uncond = self.encode_text(negative_prompts)
        denoiser = classifier_free_guidance(self.denoiser(), cond, uncond, guidance_scale, rescale=guidance_rescale)
        noise = seeded_noise(seeds, latent.shape, device)
        if generator is None:  # ancestral/SDE samplers draw fresh noise: per sample, from its seed
            generator = per_sample_generators(seeds, device)
        latents = sample(denoiser, noise, self.process, sampler=sampler, steps=steps, prediction=self.prediction,
                         generator=generator, callback=callback, **sampler_options)
        return self.decode_latents(latents)

    def generate_with(self, prompts: Sequence[str], seeds: Sequence[int], sampler: Mapping[str, Any],
                      **kwargs: Any) -> torch.Tensor:
        """`generate` with a whole sampler config (name, steps, guidance, spacing, eta, grid options, ...)."""
        return self.generate(prompts, seeds, **{**sampler_kwargs(sampler), **kwargs})


def load_text_to_image(folder: str | os.PathLike, device: str | torch.device = "cpu") -> TextToImage:
    """Rebuild the generator from an `ldm` artifact folder (any schema version) and the artifacts it references."""
    from ldmkit.diffusion.processes import process_from_artifact
    from ldmkit.ldm_checks import check_ldm_config
    from ldmkit.nn.backbones import build_backbone
    from ldmkit.nn.frozen import load_frozen_encoders

    check_ldm_config(folder, read_artifact_config(folder, "ldm"))  # before any weight is read
    tensors, config = load_artifact(folder, "ldm")
    spec = read_ldm_artifact(folder, config, tensors)
    for key in ("autoencoder", "text_encoder"):
        if not Path(spec.config[key]).exists():
            raise ArtifactError(
                f"The ldm artifact '{folder}' references its {key} at '{spec.config[key]}', which no longer exists. "
                f"Copy that folder back, or edit '{key}' in {Path(folder) / 'config.json'} to point at it."
            )
    options = spec.config.get("text_encoder_options", {})
    frozen = load_frozen_encoders(spec.config["autoencoder"], spec.config["text_encoder"],
                                  clip_skip=int(options.get("clip_skip", 1)), text_encoder_arch=options.get("model_name"),
                                  device=device)
    backbone = build_backbone(spec.backbone["arch"], spec.backbone["config"])
    backbone.load_state_dict(spec.backbone_state)
    backbone.to(device).eval().requires_grad_(False)
    process = process_from_artifact(spec.process, spec.process_tensors)
    latent = spec.config["latent"]
    return TextToImage(
        backbone=backbone, frozen=frozen, process=process, prediction=spec.process["prediction"],
        resolution=int(spec.config.get("resolution", 8 * latent["downsampling_factor"])),
        model_hash=weights_hash(folder), name=Path(folder).resolve().parent.name,
        text_context=str(options.get("context", "tokens")),
    )
