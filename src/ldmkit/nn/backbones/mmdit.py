"""Multimodal Diffusion Transformer in the SD3 mould (pure torch).

MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 4 and fig. 2): image patches
and text tokens keep separate weights (their own adaLN-Zero modulation, Q/K/V, output projection and
MLP) but attend jointly over the concatenated sequence `[image; text]`. The conditioning vector is
the time embedding plus the projected pooled text embedding; the last block's text stream only
supplies keys and values (`context_pre_only`: no output projection, no MLP), as SD3 does.

    MMDiT(MMDiTConfig(width=256, depth=4, num_heads=4, context_dim=512, pooled_dim=512))
    mmdit_from_preset("sd3_medium")           # SD3-medium's shapes: 2.03B parameters

`context_mask` (B, L) hides text tokens from every query (SD3 itself attends to all 77+256 padded
tokens; without a mask ldmkit does the same). Positions: a `pos_embed_max_size`^2 sin-cos table,
centre-cropped to the latent grid (SD3's `cropped_pos_embed`).

`state_dict_from_diffusers` maps diffusers' `SD3Transformer2DModel` weights onto `MMDiT`;
`diffusers_sd3_kwargs` gives that model's config. ldmkit's `context_dim` is diffusers'
`joint_attention_dim` (SD3: T5's 4096; here the CLIP artifact's width) and diffusers'
`caption_projection_dim` is always the model width. Not mapped: SD3.5's MMDiT-X dual-attention
layers (`dual_attention_layers`), IP-adapter and ControlNet inputs, skip-layer guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.attention import QKNorm, attention, merge_heads, split_heads
from ldmkit.nn.backbones.base import TimestepEmbedder, TwoLayerMLP, add_pooled, batch_time, renamed_keys
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


@dataclass
class MMDiTConfig:
    """Architecture of an `MMDiT`; the defaults are SD3-medium's (diffusers `SD3Transformer2DModel`
    of `stabilityai/stable-diffusion-3-medium-diffusers`). Latent grids up to
    `pos_embed_max_size` x `pos_embed_max_size` patches are accepted."""

    in_channels: int = 16
    out_channels: int = 16
    sample_size: int = 128
    patch_size: int = 2
    width: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    context_dim: int = 4096
    pooled_dim: int | None = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False  # per-head RMSNorm on Q and K (SD3.5's qk_norm="rms_norm")
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.context_dim is None or self.context_dim < 1:
            problems.append(f"context_dim={self.context_dim}: MMDiT attends jointly to text tokens, set the text width")
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            problems.append(f"patch_size={self.patch_size} must be >= 1 and divide sample_size={self.sample_size}")
        if self.width % self.num_heads or self.width % 4:
            problems.append(f"width={self.width} must be divisible by num_heads={self.num_heads} and by 4")
        if self.depth < 1:
            problems.append(f"depth={self.depth} must be >= 1")
        if self.pos_embed_max_size * self.patch_size < self.sample_size:
            problems.append(
                f"pos_embed_max_size={self.pos_embed_max_size} patches is smaller than sample_size={self.sample_size} "
                f"/ patch_size={self.patch_size}"
            )
        if problems:
            raise ValueError("MMDiTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


MMDIT_PRESETS: dict[str, MMDiTConfig] = {
    # The quickstart's 8x8x4 latents, CLIP-tiny text width (~6M parameters).
    "tiny": MMDiTConfig(
        in_channels=4, out_channels=4, sample_size=8, patch_size=1, width=128, depth=6, num_heads=2,
        context_dim=256, pooled_dim=256, pos_embed_max_size=16,
    ),
    # 32x32x4 latents (256 px), CLIP ViT-B text tokens.
    "small": MMDiTConfig(
        in_channels=4, out_channels=4, sample_size=32, patch_size=2, width=512, depth=12, num_heads=8,
        context_dim=512, pooled_dim=512, pos_embed_max_size=32,
    ),
    # Stable Diffusion 3 medium: depth 24, 24 x 64 heads, T5 4096 + CLIP 2048 pooled, 2,028,328,000 parameters.
    "sd3_medium": MMDiTConfig(),
}


class StreamLayers(nn.Module):
    """One modality's weights in a joint block: adaLN modulation, fused Q/K/V, output projection, MLP.
    `context_only` (the last text stream): a (scale, shift) modulation of the attention input only."""

    def __init__(self, config: MMDiTConfig, context_only: bool = False) -> None:
        super().__init__()
        dim = config.width
        self.context_only = context_only
        self.modulation = nn.Linear(dim, (2 if context_only else 6) * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(config.head_dim, config.qk_norm)
        self.out = None if context_only else nn.Linear(dim, dim)
        self.mlp = None if context_only else FeedForward(dim, config.mlp_ratio)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, num_heads: int):
        """-> q, k, v (B, heads, N, C/heads) and the post-attention modulation (B, 1, C) tensors."""
        params = self.modulation(c)[:, None]  # (B, 1, k*C)
        if self.context_only:
            scale, shift = params.chunk(2, dim=-1)  # diffusers' AdaLayerNormContinuous order
            post = ()
        else:
            shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = params.chunk(6, dim=-1)
            post = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        q, k, v = split_heads(self.qkv(modulate(layer_norm(x), shift, scale)), 3, num_heads)
        q, k = self.norm(q, k)
        return q, k, v, post

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, post: tuple[torch.Tensor, ...]) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = post
        x = gated_residual(x, gate_msa, self.out(attn))
        return gated_residual(x, gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


class MMDiTBlock(nn.Module):
    """Joint attention over `[image; text]` tokens, each stream with its own weights (SD3 fig. 2b)."""

    def __init__(self, config: MMDiTConfig, context_only: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.image = StreamLayers(config)
        self.text = StreamLayers(config, context_only)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None):
        """img (B, N, C), txt (B, L, C), c = SiLU(conditioning) (B, C), mask (B, 1, 1, N+L) or None."""
        n = img.shape[1]
        qi, ki, vi, post_img = self.image.pre_attention(img, c, self.num_heads)
        qt, kt, vt, post_txt = self.text.pre_attention(txt, c, self.num_heads)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qi, qt), (ki, kt), (vi, vt)))  # (B, heads, N+L, d)
        attn = merge_heads(attention(q, k, v, mask))  # (B, N+L, C)
        img = self.image.post_attention(img, attn[:, :n], post_img)
        if not self.text.context_only:
            txt = self.text.post_attention(txt, attn[:, n:], post_txt)
        return img, txt


class MMDiT(TransformerBackbone):
    """`forward(x, t, context, pooled, context_mask) -> prediction` of shape (B, out_channels, H, W).
    The backbone contract (ldmkit.nn.backbones, `base.Backbone`); `latent_size_multiple` = `patch_size`."""

    arch = "mmdit"
    config_class = MMDiTConfig
    presets = MMDIT_PRESETS

    def __init__(self, config: MMDiTConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, overrides)
        config = self.config
        dim = config.width
        self.x_embedder = PatchEmbed(config.in_channels, dim, config.patch_size)
        self.t_embedder = TimestepEmbedder(TIME_FREQ_DIM, dim)
        self.pooled_embedder = TwoLayerMLP(config.pooled_dim, dim) if config.pooled_dim else None
        self.context_embedder = nn.Linear(config.context_dim, dim)
        self.blocks = nn.ModuleList(MMDiTBlock(config, context_only=i == config.depth - 1) for i in range(config.depth))
        self.final_modulation = nn.Linear(dim, 2 * dim)  # (scale, shift), diffusers' AdaLayerNormContinuous
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)
        size = config.pos_embed_max_size
        table = sincos_positions_2d(dim, size, size, config.sample_size // config.patch_size)
        self.register_buffer("pos_embed", table.view(size, size, dim), persistent=False)  # (S, S, C)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, N(0, 0.02) embedders, zero adaLN-Zero modulations (every block starts as
        the identity) and a zero output layer, so a fresh model predicts 0 (DiT sec. 3.2)."""
        xavier_init_linears(self)
        init_patch_embed(self.x_embedder)
        normal_init(self.t_embedder.linear_1, self.t_embedder.linear_2)
        if self.pooled_embedder is not None:
            normal_init(self.pooled_embedder.linear_1, self.pooled_embedder.linear_2)
        for block in self.blocks:
            zero_init(block.image.modulation, block.text.modulation)
        zero_init(self.final_modulation, self.proj_out)

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w crop of the position table, (h*w, C) (SD3 `cropped_pos_embed`)."""
        size = self.config.pos_embed_max_size
        top, left = (size - h) // 2, (size - w) // 2
        return self.pos_embed[top:top + h, left:left + w].reshape(h * w, -1)

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
        cfg = self.config
        self._check_inputs(x, context, pooled, context_mask)
        b, p = x.shape[0], cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if max(h, w) > cfg.pos_embed_max_size:
            raise ValueError(
                f"MMDiT latents {tuple(x.shape[-2:])} make a {h}x{w} patch grid, larger than the position table's "
                f"{cfg.pos_embed_max_size}x{cfg.pos_embed_max_size} (pos_embed_max_size): raise pos_embed_max_size, "
                "or the patch_size, or train at a smaller resolution"
            )
        c = F.silu(add_pooled(self.t_embedder(batch_time(t, x)), self.pooled_embedder, pooled))  # (B, C)
        img = add_positions(self.x_embedder(x), self._positions(h, w))  # (B, N, C)
        txt = self.context_embedder(context)  # (B, L, C)
        mask = None
        if context_mask is not None:  # image tokens always visible; hidden text tokens hidden from every query
            visible = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
            mask = torch.cat([visible, context_mask], dim=1)[:, None, None, :]  # (B, 1, 1, N+L)
        for block in self.blocks:
            img, txt = self._run(block, img, txt, c, mask)
        scale, shift = self.final_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, C)
        out = self.proj_out(modulate(layer_norm(img), shift, scale))  # (B, N, p*p*C_out)
        return unpatchify(out, h, w, p, cfg.out_channels)


def mmdit_from_preset(name: str, **overrides: Any) -> MMDiT:
    """`MMDiT` from `MMDIT_PRESETS[name]` with fields replaced, e.g. `mmdit_from_preset("tiny", context_dim=512)`."""
    return MMDiT.from_preset(name, **overrides)


# --- interoperability with diffusers' SD3Transformer2DModel (pure key/shape mapping) ---

_SD3_RENAMES = [
    (r"^pos_embed\.proj\.", "x_embedder.proj."),
    (r"^time_text_embed\.timestep_embedder\.", "t_embedder."),
    (r"^time_text_embed\.text_embedder\.", "pooled_embedder."),
    (r"^norm_out\.linear\.", "final_modulation."),
    (r"^transformer_blocks\.", "blocks."),
    (r"\.norm1\.linear\.", ".image.modulation."),
    (r"\.norm1_context\.linear\.", ".text.modulation."),
    (r"\.attn\.to_out\.0\.", ".image.out."),
    (r"\.attn\.to_add_out\.", ".text.out."),
    (r"\.attn\.norm_q\.", ".image.norm.q_norm."),
    (r"\.attn\.norm_k\.", ".image.norm.k_norm."),
    (r"\.attn\.norm_added_q\.", ".text.norm.q_norm."),
    (r"\.attn\.norm_added_k\.", ".text.norm.k_norm."),
    (r"\.ff\.net\.0\.proj\.", ".image.mlp.fc1."),
    (r"\.ff\.net\.2\.", ".image.mlp.fc2."),
    (r"\.ff_context\.net\.0\.proj\.", ".text.mlp.fc1."),
    (r"\.ff_context\.net\.2\.", ".text.mlp.fc2."),
]


def state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Map a diffusers `SD3Transformer2DModel` state dict onto `MMDiT(config)`'s names (Q/K/V fused).

    Raises before anything loads when the checkpoint uses a feature `MMDiT` does not have."""
    if any(".attn2." in k for k in state_dict):
        raise ValueError(
            "this SD3 checkpoint has MMDiT-X dual-attention layers (SD3.5 medium's dual_attention_layers), which "
            "ldmkit's MMDiT does not have; use an SD3 / SD3.5-large-style checkpoint"
        )
    width = state_dict["context_embedder.weight"].shape[0]
    if width != config.width:
        raise ValueError(
            f"the checkpoint's caption_projection_dim / width is {width}, the config's width is {config.width}"
        )
    out = renamed_keys(state_dict, _SD3_RENAMES, drop={"pos_embed.pos_embed"})  # positions: recomputed
    for i in range(config.depth):
        for kind in ("weight", "bias"):
            prefix = f"blocks.{i}.attn"
            out[f"blocks.{i}.image.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.to_{n}.{kind}") for n in "qkv"])
            out[f"blocks.{i}.text.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.add_{n}_proj.{kind}") for n in "qkv"])
    return out


def diffusers_sd3_kwargs(config: MMDiTConfig) -> dict[str, Any]:
    """Keyword arguments of diffusers' `SD3Transformer2DModel` with the architecture of `MMDiT(config)`."""
    if config.pooled_dim is None or config.mlp_ratio != 4.0:
        raise ValueError(
            "SD3Transformer2DModel always has a pooled projection and a 4x MLP; got "
            f"pooled_dim={config.pooled_dim}, mlp_ratio={config.mlp_ratio}"
        )
    return dict(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim,
        caption_projection_dim=config.width,
        pooled_projection_dim=config.pooled_dim,
        pos_embed_max_size=config.pos_embed_max_size,
        qk_norm="rms_norm" if config.qk_norm else None,
    )
