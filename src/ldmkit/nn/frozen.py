"""The frozen pair an LDM is trained on: the autoencoder and the text encoder, with the latent scale/shift.

One object, used by the LDM stage (lit/ldm.py), the latent cache (data/latent_cache.py) and text-to-image
(generator.py), so the three load, normalise, encode and decode the same way. `identity` records which
weights they are (SHA-256 prefixes of the artifact's weights file or of the checkpoint file), for the latent
cache's metadata and the LDM checkpoint's resume check (`check_identity`).

Latents are normalised as (z - shift_factor) · scale_factor (Rombach et al. 2022, §4.3.2 and app. G; the
factors are measured on data when the autoencoder is exported).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ldmkit.artifacts import PRODUCERS, ArtifactError, read_artifact_config, weights_hash


@dataclass(frozen=True)
class LatentSpec:
    """The shape of one normalised latent, (channels, height, width)."""

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def encoder_hash(path: str | os.PathLike) -> str:
    """Short SHA-256 of an artifact folder's weights (`artifacts.weights_hash`) or of a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return weights_hash(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


# What the backbone cross-attends to (`model.text_context`): the text encoder's per-token states (Stable Diffusion),
# its pooled embedding as the one context token, or both (the pooled one appended as a last token).
TEXT_CONTEXTS = ("tokens", "pooled", "tokens+pooled")


def check_text_context(mode: str, context_dim: int | None = None, pooled_dim: int | None = None) -> None:
    """A known mode (checkable before any weights load); with the text encoder's widths, one they allow."""
    if mode not in TEXT_CONTEXTS:
        raise ValueError(f"text_context='{mode}' is not one of {', '.join(TEXT_CONTEXTS)}.")
    if mode == "tokens+pooled" and context_dim is not None and context_dim != pooled_dim:
        raise ValueError(f"text_context='tokens+pooled' appends the pooled embedding ({pooled_dim} wide) to the token "
                         f"states ({context_dim} wide): this text encoder's widths differ. Use text_context=tokens or "
                         "pooled, or a text encoder whose projection keeps its width.")


def text_context_dim(mode: str, context_dim: int, pooled_dim: int) -> int:
    """The width of the context the backbone attends to under `mode`."""
    check_text_context(mode, context_dim, pooled_dim)
    return pooled_dim if mode == "pooled" else context_dim


def select_text_context(tokens: torch.Tensor, pooled: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, L, D) token states and (B, P) pooled embedding -> the (B, L', D') context of `mode`."""
    if mode == "tokens":
        return tokens
    as_token = pooled[:, None, :].to(tokens.dtype)
    return as_token if mode == "pooled" else torch.cat([tokens, as_token], dim=1)


class FrozenEncoders:
    """Autoencoder + text encoder (eval mode, no grad) and the latent normalisation.
    Not an nn.Module: the LDM registers the two networks itself, so its state-dict keys stay
    `autoencoder.*` / `text_encoder.*`; this object holds references to the same modules."""

    def __init__(self, autoencoder: nn.Module, text_encoder: nn.Module, scale_factor: float, shift_factor: float,
                 identity: dict[str, Any] | None = None) -> None:
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
        self.identity = identity or {}

    # ---- facts the next pieces need -------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsampling_factor(self) -> int:
        return int(self.autoencoder.config.downsampling_factor)

    @property
    def context_dim(self) -> int:
        return int(self.text_encoder.context_dim)

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder.pooled_dim)

    @property
    def native_resolution(self) -> int:
        """The image size the autoencoder was trained at (8 latent pixels when it does not say)."""
        return int(getattr(self.autoencoder.config, "resolution", None) or 8 * self.downsampling_factor)

    def latent_spec(self, height: int, width: int | None = None) -> LatentSpec:
        width = height if width is None else width
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width} must be multiples of the autoencoder's downsampling factor {f}.")
        return LatentSpec(self.latent_channels, height // f, width // f)

    def hashes(self) -> dict[str, str]:
        return {k: self.identity[k]["weights_hash"] for k in ("autoencoder", "text_encoder") if k in self.identity}

    def to(self, device: torch.device | str) -> "FrozenEncoders":
        self.autoencoder.to(device)
        self.text_encoder.to(device)
        return self

    # ---- encode / decode ---------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale_factor + self.shift_factor

    @torch.no_grad()
    def encode_posterior(self, images: torch.Tensor):
        """The autoencoder's posterior q(z | x) (`.mean`, `.std`, `.sample(generator)`), unnormalised."""
        return self.autoencoder.encode(images)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> normalised latent samples (B, C, H/f, W/f)."""
        return self.normalize(self.encode_posterior(images).sample(generator=generator))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images in [-1, 1] (B, 3, h·f, w·f)."""
        return self.autoencoder.decode(self.denormalize(latents)).clamp(-1, 1)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(list(prompts))  # (B, L, D), (B, P)

    # ---- identity ----------------------------------------------------------------------------
    def check_identity(self, recorded: dict[str, str], where: str) -> None:
        """Refuse to continue with other frozen encoders than `recorded` ({"autoencoder": hash, "text_encoder": hash})."""
        mine = self.hashes()
        for key, option in (("autoencoder", "model.autoencoder"), ("text_encoder", "model.text_encoder")):
            if key in recorded and key in mine and recorded[key] != mine[key]:
                raise ArtifactError(
                    f"{where} was trained with another {key.replace('_', ' ')} (weights hash {recorded[key]}) than the one "
                    f"given now ({self.identity[key]['path']}, weights hash {mine[key]}). The latents or text embeddings "
                    f"would change under the model. Set {option}= to the {key.replace('_', ' ')} the run was started with, "
                    "or start a new run (no ckpt_path) to train on these encoders."
                )


def _check_paths(autoencoder: str | None, text_encoder: str | None, error: type[Exception]) -> None:
    """Cheap, actionable errors before loading anything."""
    if not autoencoder:
        raise error(
            "model=ldm needs a trained autoencoder: set model.autoencoder=PATH to the `artifact/` folder written by "
            f"`{PRODUCERS['autoencoder']}`."
        )
    if not text_encoder:
        raise error(
            "model=ldm needs a text encoder: set model.text_encoder=PATH to the `artifact/` folder written by "
            f"`{PRODUCERS['clip']}`, or to a local open_clip checkpoint file (with model.text_encoder_arch=NAME)."
        )
    read_artifact_config(autoencoder, "autoencoder")
    if Path(text_encoder).is_dir():
        read_artifact_config(text_encoder, "clip")
    elif not Path(text_encoder).is_file():
        raise error(
            f"model.text_encoder='{text_encoder}' does not exist. Point it at the artifact folder written by "
            f"`{PRODUCERS['clip']}` (its run folder's `artifact/`) or at a local open_clip checkpoint file "
            "(then also set model.text_encoder_arch, e.g. ViT-B-32)."
        )


def load_frozen_encoders(autoencoder: str | None, text_encoder: str | None, *, clip_skip: int = 1,
                         text_encoder_arch: str | None = None, device: str | torch.device = "cpu",
                         error: type[Exception] = ArtifactError) -> FrozenEncoders:
    """Load the pair from the autoencoder artifact and the clip artifact (or open_clip checkpoint file)."""
    from ldmkit.nn.autoencoder import load_autoencoder
    from ldmkit.nn.clip import load_text_encoder

    _check_paths(autoencoder, text_encoder, error)
    ae, scale, shift, _ = load_autoencoder(autoencoder, device=device)
    text = load_text_encoder(text_encoder, clip_skip=clip_skip, model_name=text_encoder_arch, device=device)
    identity = {
        "autoencoder": {
            "path": str(Path(autoencoder).resolve()), "weights_hash": encoder_hash(autoencoder),
            "latent_channels": int(ae.config.latent_channels), "downsampling_factor": int(ae.config.downsampling_factor),
            "scale_factor": scale, "shift_factor": shift,
        },
        "text_encoder": {
            "path": str(Path(text_encoder).resolve()), "weights_hash": encoder_hash(text_encoder),
            "clip_skip": int(clip_skip), "model_name": text_encoder_arch,
            "context_length": text.context_length, "context_dim": text.context_dim, "pooled_dim": text.pooled_dim,
        },
    }
    return FrozenEncoders(ae, text, scale, shift, identity)
