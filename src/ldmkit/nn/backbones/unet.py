"""Text-conditioned latent-diffusion UNet (pure torch).

The architecture is the LDM / Stable Diffusion 1.x UNet (Rombach et al. 2022, `openaimodel.py`
`UNetModel`), itself ADM's UNet (Dhariwal & Nichol 2021) with spatial transformers: per level,
`num_res_blocks` ResNet blocks conditioned on the timestep embedding, each followed by a
transformer block (self-attention, cross-attention over the text tokens, GEGLU) on the levels in
`attention_levels`; a middle block; a mirrored decoder with skip connections.

Build it from a typed config, a preset or keyword arguments:

    UNet(UNetConfig(model_channels=64, channel_mult=(1, 2, 2), context_dim=512))
    unet_from_preset("tiny", context_dim=512)
    UNet(model_channels=64, channel_mult=[1, 2, 2])       # e.g. from Hydra `_target_: ldmkit.nn.backbones.unet.UNet`

It is the `unet` entry of the backbone registry (ldmkit.nn.backbones): `build_backbone("unet", config)`.

`state_dict_from_diffusers` loads diffusers `UNet2DConditionModel` weights (e.g. SD1.5's) into the
`sd15` preset; `diffusers_unet_kwargs` gives the diffusers config of the same architecture.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.attention import SpatialTransformer
from ldmkit.nn.backbones.base import (  # noqa: F401  (timestep_embedding: re-exported from its former home)
    Backbone, TimestepEmbedder, add_pooled, attention_mask, batch_time, renamed_keys, timestep_embedding,
)
from ldmkit.nn.blocks import Downsample, ResnetBlock, Upsample, group_norm, zero_module

TimestepMLP = TimestepEmbedder  # its former name


@dataclass
class UNetConfig:
    """Architecture of a `UNet`; the defaults are Stable Diffusion 1.x's UNet.

    Exactly one of `num_heads` (same head count on every level, SD1) and `head_dim` (heads =
    channels // head_dim, SD2/SDXL) is set. `context_dim=None` builds self-attention-only
    transformers (no text conditioning). `pooled_dim` adds a linear projection of a pooled text
    embedding to the timestep embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # the middle block always has a transformer, as in LDM
    num_heads: int | None = 8
    head_dim: int | None = None
    transformer_depth: int = 1
    context_dim: int | None = 768
    pooled_dim: int | None = None
    time_embed_dim: int | None = None  # default 4 * model_channels
    scale_shift_norm: bool = False  # FiLM/AdaGN timestep conditioning: norm(h) * (1 + scale) + shift
    norm_groups: int = 32
    # GroupNorm eps of the ResNet blocks and the output norm (diffusers' `norm_eps`; SD 1.x/2.x: 1e-5). The
    # transformers' GroupNorm keeps 1e-6, as in LDM and diffusers' Transformer2DModel.
    norm_eps: float = 1e-6
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # JSON and Hydra hand sequences back as lists / ListConfig: normalise so configs compare equal.
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(sorted(int(level) for level in self.attention_levels))
        self.norm_eps = float(self.norm_eps)
        self._validate()

    def _validate(self) -> None:
        levels = len(self.channel_mult)
        if levels == 0 or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        bad = [level for level in self.attention_levels if not 0 <= level < levels]
        if bad:
            raise ValueError(
                f"UNetConfig.attention_levels {self.attention_levels} has levels {bad} outside 0..{levels - 1} "
                f"(channel_mult {self.channel_mult} has {levels} levels)"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"UNetConfig needs exactly one of num_heads (got {self.num_heads}) and head_dim (got {self.head_dim}); "
                "set the other to null"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"UNetConfig.norm_eps must be > 0 (GroupNorm epsilon, e.g. 1e-6 or SD's 1e-5), got {self.norm_eps}")
        if self.model_channels % 2:
            raise ValueError(f"UNetConfig.model_channels must be even (sinusoidal embedding), got {self.model_channels}")
        for width in self.attention_widths():
            if width % (self.num_heads or self.head_dim):
                what = f"num_heads={self.num_heads}" if self.num_heads else f"head_dim={self.head_dim}"
                raise ValueError(f"UNetConfig: attention width {width} channels is not divisible by {what}")
        if self.num_res_blocks < 1 or self.transformer_depth < 1:
            raise ValueError(
                f"UNetConfig.num_res_blocks ({self.num_res_blocks}) and transformer_depth "
                f"({self.transformer_depth}) must be >= 1"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels

    def attention_widths(self) -> list[int]:
        return [self.widths[level] for level in self.attention_levels] + [self.widths[-1]]  # + middle

    def heads(self, width: int) -> int:
        return self.num_heads or width // self.head_dim


UNET_PRESETS: dict[str, UNetConfig] = {
    # 8x8x4 latents of 32 px images; attention at 8x8 and 4x4; trains in minutes on 2 CPU cores.
    "tiny": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
        num_heads=None, head_dim=32, context_dim=256,
    ),
    # 16x16 to 32x32 latents (128-256 px images).
    "small": UNetConfig(
        model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
        num_heads=None, head_dim=64, context_dim=512,
    ),
    # 32x32 latents (256 px), LDM-paper scale.
    "base": UNetConfig(
        model_channels=192, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
        num_heads=None, head_dim=64, context_dim=768,
    ),
    # Stable Diffusion 1.x (64x64 latents, 512 px, CLIP ViT-L/14 text tokens); 859.52M parameters.
    "sd15": UNetConfig(),
}


class UNetLevel(nn.Module):
    """One resolution of the UNet: ResNet blocks, a transformer after each (attention levels), a resampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], resample: nn.Module | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty, or one per ResNet block
        self.resample = resample


class UNet(Backbone):
    """`forward(x, t, context, pooled, context_mask) -> prediction` with the shape of `x`.
    The backbone contract (ldmkit.nn.backbones, `base.Backbone`); `latent_size_multiple` = `downsampling_factor`."""

    arch = "unet"
    config_class = UNetConfig
    presets = UNET_PRESETS
    size_knob = "channel_mult"

    def __init__(self, config: UNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, overrides)
        config = self.config
        c, emb_dim, widths = config.model_channels, config.emb_dim, config.widths

        self.time_embed = TimestepEmbedder(c, emb_dim)
        self.pooled_proj = nn.Linear(config.pooled_dim, emb_dim) if config.pooled_dim else None
        self.conv_in = nn.Conv2d(config.in_channels, c, 3, padding=1)

        def resnet(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(
                cin, cout, emb_channels=emb_dim, dropout=config.dropout, num_groups=config.norm_groups,
                scale_shift_norm=config.scale_shift_norm, zero_init=True, eps=config.norm_eps,
            )

        def transformer(width: int) -> SpatialTransformer:
            return SpatialTransformer(
                width, config.heads(width), config.context_dim, config.transformer_depth, config.norm_groups
            )

        last = len(widths) - 1
        skip_widths, ch = [c], c
        self.down_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            resnets, attentions = [], []
            for _ in range(config.num_res_blocks):
                resnets.append(resnet(ch, width))
                ch = width
                if level in config.attention_levels:
                    attentions.append(transformer(ch))
                skip_widths.append(ch)
            downsample = Downsample(ch) if level != last else None
            if downsample is not None:
                skip_widths.append(ch)
            self.down_blocks.append(UNetLevel(resnets, attentions, downsample))

        self.mid_block = UNetLevel([resnet(ch, ch), resnet(ch, ch)], [transformer(ch)], None)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, resnets, attentions = widths[level], [], []
            for _ in range(config.num_res_blocks + 1):
                resnets.append(resnet(ch + skip_widths.pop(), width))
                ch = width
                if level in config.attention_levels:
                    attentions.append(transformer(ch))
            self.up_blocks.append(UNetLevel(resnets, attentions, Upsample(ch) if level != 0 else None))

        self.norm_out = group_norm(ch, config.norm_groups, config.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> UNet:
        return cls(UNetConfig(**kwargs))

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def latent_size_multiple(self) -> int:
        """Latent H and W must be multiples of this (one halving per level below the first)."""
        return self.downsampling_factor

    def _size_rule(self) -> str:
        return f"{len(self.config.channel_mult)} levels"

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W); t (B,) or scalar timesteps, int or float; context (B, L, context_dim) text tokens;
        pooled (B, pooled_dim); context_mask (B, L) bool, True = attend to the token. -> (B, out_channels, H, W)."""
        self._check_inputs(x, context, pooled, context_mask)
        emb = add_pooled(self.time_embed(batch_time(t, x)), self.pooled_proj, pooled)  # (B, emb_dim)
        mask = attention_mask(context_mask)  # (B, 1, 1, L): heads, queries

        h = self.conv_in(x)  # (B, model_channels, H, W)
        skips = [h]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                h = self._layer(level, i, h, emb, context, mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C, H/2, W/2)
                skips.append(h)
        h = self._layer(self.mid_block, 0, h, emb, context, mask)
        h = self._run(self.mid_block.resnets[1], h, emb)
        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = self._layer(level, i, h, emb, context, mask)
            if level.resample is not None:
                h = level.resample(h)  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _layer(self, level: UNetLevel, i: int, h, emb, context, mask) -> torch.Tensor:
        """The i-th ResNet block of a level, then its transformer if the level has attention."""
        h = self._run(level.resnets[i], h, emb)
        if len(level.attentions):
            h = self._run(level.attentions[i], h, context, mask)
        return h


def unet_from_preset(name: str, **overrides: Any) -> UNet:
    """`UNet` from `UNET_PRESETS[name]` with some fields replaced, e.g. `unet_from_preset("tiny", context_dim=512)`."""
    return UNet.from_preset(name, **overrides)


# --- interoperability with diffusers' UNet2DConditionModel (pure key/shape mapping, no diffusers import) ---

_DIFFUSERS_RENAMES = [
    (r"^time_embedding\.", "time_embed."),
    (r"^class_embedding\.", "pooled_proj."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.downsamplers\.0\.conv\.", ".resample.op."),
    (r"\.upsamplers\.0\.conv\.", ".resample.conv."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
]


def state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers `UNet2DConditionModel` state dict (e.g. SD1.5's `unet/`) onto `UNet`'s names.

    Q/K/V are concatenated into the fused projections and SD1's 1x1-conv `proj_in`/`proj_out`
    kernels flattened to linear weights. State dicts hold no eps: build the UNet with SD's GroupNorm
    eps (`UNetConfig(norm_eps=1e-5)`, what `ldmkit.interop` reads from `unet/config.json`).
    """
    out = renamed_keys(state_dict, _DIFFUSERS_RENAMES)
    for key, value in out.items():
        if re.search(r"attentions\.\d+\.proj_(in|out)\.weight$", key) and value.ndim == 4:
            out[key] = value.flatten(1)  # (C, C, 1, 1) conv kernel -> (C, C) linear weight
    for prefix in sorted({key.rsplit(".to_q.", 1)[0] for key in out if ".to_q." in key}):
        q, k, v = (out.pop(f"{prefix}.to_{name}.weight") for name in "qkv")
        if prefix.endswith("attn1"):
            out[f"{prefix}.qkv.weight"] = torch.cat([q, k, v])
        else:
            out[f"{prefix}.q.weight"], out[f"{prefix}.kv.weight"] = q, torch.cat([k, v])
    return out


def diffusers_unet_kwargs(config: UNetConfig) -> dict[str, Any]:
    """Keyword arguments of diffusers' `UNet2DConditionModel` with the same architecture as `UNet(config)`."""
    if config.context_dim is None or any(w % config.norm_groups for w in config.widths):
        raise ValueError(
            "UNet2DConditionModel needs cross-attention (context_dim set) and widths divisible by norm_groups; "
            f"got context_dim={config.context_dim}, widths {config.widths}, norm_groups {config.norm_groups}"
        )
    levels = range(len(config.channel_mult))
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.widths,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in config.attention_levels else "UpBlock2D" for i in reversed(levels)),
        layers_per_block=config.num_res_blocks,
        attention_head_dim=tuple(max(1, config.heads(w)) for w in config.widths),  # diffusers' name for the head count
        transformer_layers_per_block=config.transformer_depth,
        cross_attention_dim=config.context_dim,
        use_linear_projection=True,
        norm_num_groups=config.norm_groups,
        norm_eps=config.norm_eps,
        resnet_time_scale_shift="scale_shift" if config.scale_shift_norm else "default",
        time_embedding_dim=config.emb_dim,
        dropout=config.dropout,
        class_embed_type="simple_projection" if config.pooled_dim else None,
        projection_class_embeddings_input_dim=config.pooled_dim,
    )
