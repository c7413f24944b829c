"""KL-regularised convolutional autoencoder (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G), pure torch.

The encoder maps an image (B, 3, H, W) in [-1, 1] to a diagonal Gaussian posterior over
latents (B, latent_channels, H/f, W/f) with f = 2 ** (len(channel_mult) - 1); the decoder
maps latents back to images. `load_autoencoder` rebuilds a trained model from the artifact
folder that `AutoencoderModule.export_artifact` writes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldmkit.artifacts import ArtifactError, PRODUCERS, load_artifact
from ldmkit.nn.blocks import Downsample, ResnetBlock, SpatialSelfAttention, Upsample, group_norm

ARTIFACT_KIND = "autoencoder"


@dataclass
class AutoencoderConfig:
    """Architecture of `AutoencoderKL`; round-trips through JSON via `to_dict` / `from_dict`."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    # one entry per resolution level; the downsampling factor is 2 ** (len(channel_mult) - 1)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    mid_attention: bool = True
    attention_heads: int = 1
    num_groups: int = 32
    dropout: float = 0.0
    # image size the model is trained at (checked against the downsampling factor); None: any multiple of it
    resolution: int | None = None
    # initial log-variance of the posterior (bias of its logvar channels): 0 starts at std 1, where
    # the sampled latents are mostly noise until the encoder learns to shrink it; e.g. -6 (std 0.05)
    # lets a short run learn the reconstruction from the start. Initialisation only.
    logvar_init: float = 0.0
    # pad right/bottom only before each stride-2 conv, as Stable Diffusion's VAE (set by ldmkit.interop)
    asymmetric_downsample: bool = False

    def __post_init__(self) -> None:
        # Hydra hands lists over as ListConfig; keep a plain tuple so asdict/JSON and equality behave
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult:
            raise ValueError("AutoencoderConfig.channel_mult must have at least one level, e.g. [1, 2, 4] for factor 4")
        for name in ("in_channels", "out_channels", "base_channels", "latent_channels", "num_groups", "attention_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"AutoencoderConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.resolution is not None:
            check_resolution(self.resolution, self.downsampling_factor)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the latents for square images of `resolution` (default: the configured one)."""
        resolution = resolution if resolution is not None else self.resolution
        if resolution is None:
            raise ValueError("latent_shape needs a resolution: none was passed and AutoencoderConfig.resolution is None")
        check_resolution(resolution, self.downsampling_factor)
        side = resolution // self.downsampling_factor
        return (self.latent_channels, side, side)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoencoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)


def check_resolution(resolution: int, factor: int) -> None:
    """Fail with the fix when images cannot be downsampled evenly by the autoencoder."""
    if resolution <= 0 or resolution % factor:
        example = max(factor, round(resolution / factor) * factor)
        raise ValueError(
            f"resolution {resolution} is not divisible by the autoencoder's downsampling factor {factor}: "
            f"set data.resolution to a multiple of {factor}, e.g. {example}"
        )


class DiagonalGaussianDistribution:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) from the encoder's 2*C output channels."""

    # clamp as in LDM: keeps exp(logvar) finite early in training
    LOGVAR_RANGE = (-30.0, 20.0)

    def __init__(self, parameters: torch.Tensor) -> None:
        self.mean, logvar = parameters.chunk(2, dim=1)  # each (B, C, h, w)
        self.logvar = logvar.clamp(*self.LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps; eps drawn from `generator` (on its own device)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, h, w); `other` defaults to N(0, I)."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dims)
        return 0.5 * (
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        ).sum(dims)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = [cfg.base_channels * m for m in cfg.channel_mult]
        block = dict(dropout=cfg.dropout, num_groups=cfg.num_groups)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = ch[0]
        for level, width in enumerate(ch):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.blocks.append(ResnetBlock(prev, width, **block))
                prev = width
            stage.downsample = Downsample(prev, asymmetric_pad=cfg.asymmetric_downsample) if level < len(ch) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = MidBlock(prev, cfg)
        self.norm_out = group_norm(prev, cfg.num_groups)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch0, H, W)
        for stage in self.down:
            for blk in stage.blocks:
                h = blk(h)
            h = stage.downsample(h)
        h = self.mid(h)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = [cfg.base_channels * m for m in cfg.channel_mult]
        block = dict(dropout=cfg.dropout, num_groups=cfg.num_groups)
        prev = ch[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, prev, 3, padding=1)
        self.mid = MidBlock(prev, cfg)
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            # one more block per level than the encoder, as in LDM
            for _ in range(cfg.num_res_blocks + 1):
                stage.blocks.append(ResnetBlock(prev, ch[level], **block))
                prev = ch[level]
            stage.upsample = Upsample(prev) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = group_norm(prev, cfg.num_groups)
        self.conv_out = nn.Conv2d(prev, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch[-1], h, w)
        for stage in self.up:
            for blk in stage.blocks:
                h = blk(h)
            h = stage.upsample(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))  # (B, 3, H, W)


class MidBlock(nn.Module):
    """ResNet → self-attention → ResNet at the lowest resolution."""

    def __init__(self, channels: int, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.block1 = ResnetBlock(channels, dropout=cfg.dropout, num_groups=cfg.num_groups)
        self.attn = (
            SpatialSelfAttention(channels, num_heads=cfg.attention_heads, num_groups=cfg.num_groups)
            if cfg.mid_attention
            else nn.Identity()
        )
        self.block2 = ResnetBlock(channels, dropout=cfg.dropout, num_groups=cfg.num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))


class AutoencoderKL(nn.Module):
    """Encoder → diagonal Gaussian posterior → decoder; see the module docstring."""

    def __init__(self, config: AutoencoderConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else AutoencoderConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the nets and the latent space, as in LDM (quant_conv / post_quant_conv)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        if config.logvar_init:
            with torch.no_grad():
                self.quant_conv.bias[config.latent_channels :] += config.logvar_init

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        for side in x.shape[-2:]:
            check_resolution(side, self.downsampling_factor)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


@torch.no_grad()
def round_trip(autoencoder: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """decode(encode(x).mode()) clamped to [-1, 1], in batches on the autoencoder's device: what the autoencoder
    keeps of each image, so roughly the most a model that draws through it can show (a small star it returns as
    a blob is not a star)."""
    device = next(autoencoder.parameters()).device
    out = [autoencoder.decode(autoencoder.encode(images[i : i + batch_size].to(device)).mode()).clamp(-1, 1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def autoencoder_state_errors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Differences between a model's state dict and loaded tensors (missing, unexpected, shape)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: artifact {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    errors = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            errors.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    return errors


def load_autoencoder(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    latent_channels: int | None = None,
) -> tuple[AutoencoderKL, float, float, dict[str, Any]]:
    """Rebuild a trained autoencoder from its artifact folder.

    Returns `(model, scale_factor, shift_factor, config)`: the model in eval mode with
    `requires_grad=False`, and the factors that normalise latents as
    `(z - shift_factor) * scale_factor` (measured on training data at export).
    `latent_channels`, when given, is checked against the artifact (e.g. the UNet's input channels).
    """
    tensors, config = load_artifact(folder, ARTIFACT_KIND, device="cpu")
    hint = f" Re-export it with `{PRODUCERS[ARTIFACT_KIND]}`."
    for key in ("architecture", "scale_factor", "shift_factor"):
        if key not in config:
            raise ArtifactError(f"autoencoder artifact '{folder}' has no '{key}' in its config.json; it is incomplete.{hint}")
    try:
        arch = AutoencoderConfig.from_dict(config["architecture"])
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"autoencoder artifact '{folder}' has an invalid architecture in config.json: {err}.{hint}") from err
    if latent_channels is not None and arch.latent_channels != latent_channels:
        raise ArtifactError(
            f"autoencoder artifact '{folder}' has {arch.latent_channels} latent channels, but {latent_channels} are "
            f"expected here: train the diffusion model with in_channels={arch.latent_channels}, or use an autoencoder "
            f"with latent_channels={latent_channels}."
        )
    with torch.device("meta"):
        # built on meta: no random init; the loaded tensors are assigned in place of the parameters
        model = AutoencoderKL(arch)
    errors = autoencoder_state_errors(model, tensors)
    if errors:
        raise ArtifactError(
            f"autoencoder artifact '{folder}': weights.safetensors does not match the architecture in config.json "
            f"({'; '.join(errors)}). The two files come from different exports or were edited.{hint}"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.to(device).eval().requires_grad_(False)
    return model, float(config["scale_factor"]), float(config["shift_factor"]), config


@torch.no_grad()
def measure_latent_stats(
    model: AutoencoderKL,
    batches: Iterable[Any],
    num_batches: int | None = 32,
    use: str = "mean",
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Mean and std of the latents of up to `num_batches` batches (all if fewer or None).

    `use="mean"` encodes to the posterior mean, `"sample"` draws from the posterior. The
    diffusion stage normalises latents as `(z - shift) * scale` with shift = mean and
    scale = 1 / std (the SD3 / FLUX convention; SD 1.x fixed scale = 0.18215, shift = 0).
    Batches are dicts with an "image" tensor (docs/CONVENTIONS.md) or plain image tensors.
    """
    if use not in ("mean", "sample"):
        raise ValueError(f"measure_latent_stats: use must be 'mean' or 'sample', got {use!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = total_sq = None
    count = seen_batches = seen_images = 0
    try:
        for batch in itertools.islice(batches, num_batches):
            x = batch["image"] if isinstance(batch, dict) else batch
            posterior = model.encode(x.to(device=device, dtype=torch.float32))
            z = (posterior.mode() if use == "mean" else posterior.sample(generator)).double()  # (B, C, h, w)
            per_channel, per_channel_sq = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))
            total = per_channel if total is None else total + per_channel
            total_sq = per_channel_sq if total_sq is None else total_sq + per_channel_sq
            count += z.numel() // z.shape[1]
            seen_batches += 1
            seen_images += z.shape[0]
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("measure_latent_stats got no batches: the training dataloader is empty")
    channel_mean = total / count
    channel_var = (total_sq / count - channel_mean.pow(2)).clamp_min(0)
    mean = channel_mean.mean()
    # pooled over channels: E[z^2] - E[z]^2
    std = (total_sq.sum() / (count * len(total)) - mean.pow(2)).clamp_min(0).sqrt()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {float(std)}: the autoencoder's latents are constant or not finite; it did not train")
    return {
        "mean": float(mean),
        "std": float(std),
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_var.sqrt().tolist(),
        "use": use,
        "num_batches": seen_batches,
        "num_images": seen_images,
    }
