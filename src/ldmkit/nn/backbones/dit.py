"""Text-conditioned Diffusion Transformer in the PixArt-α mould (pure torch).

DiT (Peebles & Xie 2023, `models.py`) on latent patches with 2-D sin-cos positions; each block is
self-attention, cross-attention to the projected text tokens and an MLP (PixArt-α, Chen et al. 2023,
sec. 2.3, `PixArt_blocks.py`). Time conditioning is either

- `adaln_single` (PixArt-α): one `t_block` maps the time embedding to 6 x width shift/scale/gate
  values shared by all blocks, each block adding its own learned `scale_shift_table`; or
- `adaln_zero` (DiT): each block has its own zero-initialised modulation Linear.

A pooled text embedding (`pooled_dim`) is projected and added to the time embedding, as SD3 does
(PixArt has none). Build from a config, a preset or keyword arguments:

    DiT(DiTConfig(width=384, depth=12, num_heads=6, context_dim=512))
    dit_from_preset("tiny", context_dim=256, pooled_dim=256)

`state_dict_from_diffusers` maps diffusers' `PixArtTransformer2DModel` weights onto `DiT`;
`diffusers_pixart_kwargs` gives that model's config for a `DiTConfig`. What does not map: PixArt's
resolution / aspect-ratio conditions (`use_additional_conditions`, on by default at sample_size 128:
build it with False), learned sigma (`out_channels = 2 * in_channels`: set out_channels to match),
a caption projection-free model (ldmkit always projects the text encoder's width to the model
width), the pooled projection and qk-norm (ldmkit additions, no PixArt counterpart), `adaln_zero`.
diffusers' timestep input is the same number ldmkit passes as `t` (the noise process's network time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.attention import CrossAttention, SelfAttention
from ldmkit.nn.backbones.base import TimestepEmbedder, TwoLayerMLP, add_pooled, attention_mask, batch_time, renamed_keys
from ldmkit.nn.backbones.transformer_layers import (
    TIME_FREQ_DIM,
    FeedForward,
    PatchEmbed,
    TransformerBackbone,
    add_positions,
    gated_residual,
    init_patch_embed,
    layer_norm,
    modulate,
    normal_init,
    sincos_positions_2d,
    unpatchify,
    xavier_init_linears,
    zero_init,
)

CONDITIONINGS = ("adaln_single", "adaln_zero")


@dataclass
class DiTConfig:
    """Architecture of a `DiT`. `sample_size` is the latent size the position table is laid out for
    (other sizes stretch it, PixArt's interpolation); `context_dim=None` builds an unconditional DiT."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 32
    patch_size: int = 2
    width: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int | None = 768
    pooled_dim: int | None = None
    conditioning: str = "adaln_single"  # adaln_single (PixArt-α) | adaln_zero (DiT)
    qk_norm: bool = False
    interpolation_scale: float | None = None  # default max(sample_size // 64, 1), as PixArt
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.conditioning not in CONDITIONINGS:
            problems.append(f"conditioning={self.conditioning!r} is not one of {CONDITIONINGS}")
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            problems.append(f"patch_size={self.patch_size} must be >= 1 and divide sample_size={self.sample_size}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            problems.append(f"width={self.width} must be num_heads={self.num_heads} x an even head width")
        if self.width % 4:
            problems.append(f"width={self.width} must be divisible by 4 (2-D sin-cos positions)")
        if self.depth < 1:
            problems.append(f"depth={self.depth} must be >= 1")
        if problems:
            raise ValueError("DiTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_interpolation(self) -> float:
        return self.interpolation_scale or max(self.sample_size // 64, 1)


DIT_PRESETS: dict[str, DiTConfig] = {
    # The quickstart's 8x8x4 latents: 64 tokens of width 192, 6 blocks (~5M parameters).
    "tiny": DiTConfig(sample_size=8, patch_size=1, width=192, depth=6, num_heads=3, context_dim=256),
    # DiT table 1 widths/depths on 32x32 latents (256 px), patch 2.
    "S": DiTConfig(width=384, depth=12, num_heads=6),
    "B": DiTConfig(width=768, depth=12, num_heads=12),
    "L": DiTConfig(width=1024, depth=24, num_heads=16),
    "XL": DiTConfig(width=1152, depth=28, num_heads=16),  # PixArt-α's XL/2 block stack
}


def adaln_modulation(conditioning: str, dim: int, n: int) -> tuple[nn.Parameter | None, nn.Linear | None]:
    """(table, linear), one of them None: `n` shift/scale/gate vectors of width `dim` per layer come from
    the shared `t_block` output plus a learned (n, dim) table (adaLN-single, PixArt-α sec. 2.3), or from
    the layer's own Linear of SiLU(c) (adaLN-Zero, DiT sec. 3.2)."""
    if conditioning == "adaln_single":
        return nn.Parameter(torch.randn(n, dim) / dim**0.5), None
    return None, nn.Linear(dim, n * dim)


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, un-modulated cross-attention, adaLN-modulated MLP (PixArt-α fig. 4)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.width
        self.attn = SelfAttention(dim, config.num_heads, config.qk_norm, bias=True)
        self.cross_attn = CrossAttention(dim, dim, config.num_heads, config.qk_norm, bias=True) if config.context_dim else None
        self.mlp = FeedForward(dim, config.mlp_ratio)
        self.scale_shift_table, self.modulation = adaln_modulation(config.conditioning, dim, 6)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None):
        """x (B, N, C); cond (B, 6, C) from `t_block` (adaLN-single) or SiLU(c) (B, C) (adaLN-Zero)."""
        if self.scale_shift_table is not None:
            params = self.scale_shift_table[None] + cond  # (B, 6, C)
        else:
            params = self.modulation(cond).unflatten(1, (6, -1))  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = params.chunk(6, dim=1)  # each (B, 1, C)
        x = gated_residual(x, gate_msa, self.attn(modulate(layer_norm(x), shift_msa, scale_msa)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        return gated_residual(x, gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


class DiT(TransformerBackbone):
    """`forward(x, t, context, pooled, context_mask) -> prediction` of shape (B, out_channels, H, W).
    The backbone contract (ldmkit.nn.backbones, `base.Backbone`); `latent_size_multiple` = `patch_size`."""

    arch = "dit"
    config_class = DiTConfig
    presets = DIT_PRESETS

    def __init__(self, config: DiTConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, overrides)
        config = self.config
        dim = config.width
        self.x_embedder = PatchEmbed(config.in_channels, dim, config.patch_size)
        self.t_embedder = TimestepEmbedder(TIME_FREQ_DIM, dim)
        self.t_block = nn.Linear(dim, 6 * dim) if config.conditioning == "adaln_single" else None
        self.pooled_embedder = TwoLayerMLP(config.pooled_dim, dim) if config.pooled_dim else None
        # PixArt's caption projection (Linear-GELU-Linear) from the text encoder's width to the model's.
        self.context_embedder = TwoLayerMLP(config.context_dim, dim, act="gelu") if config.context_dim else None
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_scale_shift_table, self.final_modulation = adaln_modulation(config.conditioning, dim, 2)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        grid = config.sample_size // config.patch_size
        self.register_buffer("pos_embed", self._positions(grid, grid), persistent=False)  # (N, C)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-α / DiT init: Xavier linears, N(0, 0.02) embedders, zero cross-attention outputs,
        zero adaLN-Zero modulations and a zero output layer, so a fresh model predicts 0."""
        xavier_init_linears(self)
        init_patch_embed(self.x_embedder)
        normal_init(self.t_embedder.linear_1, self.t_embedder.linear_2)
        for mlp in (self.pooled_embedder, self.context_embedder):
            if mlp is not None:
                normal_init(mlp.linear_1, mlp.linear_2)
        if self.t_block is not None:
            normal_init(self.t_block)
        for block in self.blocks:
            if block.cross_attn is not None:
                zero_init(block.cross_attn.out)
            if block.modulation is not None:
                zero_init(block.modulation)
        if self.final_modulation is not None:
            zero_init(self.final_modulation)
        zero_init(self.proj_out)

    def _positions(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        cfg = self.config
        base = cfg.sample_size // cfg.patch_size
        return sincos_positions_2d(cfg.width, h, w, base, cfg.grid_interpolation, device)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W); t (B,) or scalar network time; context (B, L, context_dim); pooled (B, pooled_dim);
        context_mask (B, L) bool, True = attend to the token. -> (B, out_channels, H, W)."""
        self._check_inputs(x, context, pooled, context_mask)
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        temb = add_pooled(self.t_embedder(batch_time(t, x)), self.pooled_embedder, pooled)  # (B, C)
        positions = self.pos_embed if self.pos_embed.shape[0] == h * w and h == w else self._positions(h, w, x.device)
        tokens = add_positions(self.x_embedder(x), positions)  # (B, N, C)
        if self.context_embedder is not None:
            context = self.context_embedder(context)  # (B, L, C)
        mask = attention_mask(context_mask)  # (B, 1, 1, L)
        cond = self.t_block(F.silu(temb)).unflatten(1, (6, -1)) if self.t_block is not None else F.silu(temb)
        for block in self.blocks:
            tokens = self._run(block, tokens, cond, context, mask)
        if self.final_scale_shift_table is not None:
            shift, scale = (self.final_scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)  # (B, 1, C)
        else:
            shift, scale = self.final_modulation(F.silu(temb))[:, None].chunk(2, dim=-1)
        out = self.proj_out(modulate(layer_norm(tokens), shift, scale))  # (B, N, p*p*C_out)
        return unpatchify(out, h, w, p, self.config.out_channels)


def dit_from_preset(name: str, **overrides: Any) -> DiT:
    """`DiT` from `DIT_PRESETS[name]` with fields replaced, e.g. `dit_from_preset("S", context_dim=512)`."""
    return DiT.from_preset(name, **overrides)


# --- interoperability with diffusers' PixArtTransformer2DModel (pure key/shape mapping) ---

_PIXART_RENAMES = [
    (r"^pos_embed\.proj\.", "x_embedder.proj."),
    (r"^adaln_single\.emb\.timestep_embedder\.", "t_embedder."),
    (r"^adaln_single\.linear\.", "t_block."),
    (r"^caption_projection\.", "context_embedder."),
    (r"^transformer_blocks\.", "blocks."),
    (r"^scale_shift_table$", "final_scale_shift_table"),
    (r"\.attn1\.to_out\.0\.", ".attn.out."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.out."),
    (r"\.attn2\.to_q\.", ".cross_attn.q."),
    (r"\.ff\.net\.0\.proj\.", ".mlp.fc1."),
    (r"\.ff\.net\.2\.", ".mlp.fc2."),
]


def state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """Map a diffusers `PixArtTransformer2DModel` state dict onto `DiT(config)`'s names (Q/K/V fused).

    Raises before anything loads when the checkpoint uses a feature `DiT` does not have."""
    if any(k.startswith("adaln_single.emb.resolution_embedder") for k in state_dict):
        raise ValueError(
            "this PixArt checkpoint uses resolution / aspect-ratio conditions (use_additional_conditions=True), "
            "which ldmkit's DiT does not have; use a checkpoint trained without them (e.g. PixArt-α 256/512)"
        )
    if config.context_dim is not None and "caption_projection.linear_1.weight" not in state_dict:
        raise ValueError("this PixArt checkpoint has no caption_projection; ldmkit's DiT needs one (caption_channels set)")
    if config.conditioning != "adaln_single":
        raise ValueError(f"PixArt weights need conditioning='adaln_single', the config has {config.conditioning!r}")
    out = renamed_keys(state_dict, _PIXART_RENAMES, drop={"pos_embed.pos_embed"})  # positions: recomputed
    for i in range(config.depth):
        for kind in ("weight", "bias"):
            q, k, v = (out.pop(f"blocks.{i}.attn1.to_{n}.{kind}") for n in "qkv")
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([q, k, v])
            if config.context_dim is not None:
                k, v = (out.pop(f"blocks.{i}.attn2.to_{n}.{kind}") for n in "kv")
                out[f"blocks.{i}.cross_attn.kv.{kind}"] = torch.cat([k, v])
    return out


def diffusers_pixart_kwargs(config: DiTConfig) -> dict[str, Any]:
    """Keyword arguments of diffusers' `PixArtTransformer2DModel` with the architecture of `DiT(config)`."""
    if config.context_dim is None or config.pooled_dim or config.qk_norm or config.conditioning != "adaln_single":
        raise ValueError(
            "PixArtTransformer2DModel has cross-attention, adaLN-single, no pooled embedding and no qk-norm; got "
            f"context_dim={config.context_dim}, pooled_dim={config.pooled_dim}, qk_norm={config.qk_norm}, "
            f"conditioning={config.conditioning!r}"
        )
    if config.mlp_ratio != 4.0:
        raise ValueError(f"PixArtTransformer2DModel's MLP is 4x wide, the config has mlp_ratio={config.mlp_ratio}")
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        cross_attention_dim=config.width,
        caption_channels=config.context_dim,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        interpolation_scale=config.grid_interpolation,
        use_additional_conditions=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
        activation_fn="gelu-approximate",
    )
