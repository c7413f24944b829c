"""Layers shared by the transformer backbones `dit.py` and `mmdit.py` (pure torch).

Patchify / unpatchify and 2-D sin-cos positions (ViT, Dosovitskiy et al. 2021; DiT, Peebles & Xie
2023), the sinusoidal timestep embedding and its MLP, pre-LayerNorm modulation (adaLN, DiT sec. 3.2),
multi-head attention through `F.scaled_dot_product_attention` with fused projections and optional
per-head RMS qk-norm (Dehghani et al. 2023; SD3 sec. 5.3.2). Masks follow SDPA: `True` = attend.

Parameter names are ldmkit's own; `dit.py` / `mmdit.py` map diffusers' names onto them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TIME_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP (DiT, PixArt, SD3)
NORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """`[cos(t w_i), sin(t w_i)]`, `w_i = max_period^(-i / (dim/2))` (Vaswani et al. 2017; diffusers'
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`). Float32, fractional t allowed. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_positions_2d(
    dim: int, grid_h: int, grid_w: int, base_size: float, interpolation_scale: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """2-D sin-cos position table (MAE / DiT `get_2d_sincos_pos_embed`, PixArt's scaled variant), (h*w, dim).

    Each axis is stretched to `base_size` positions and divided by `interpolation_scale` (PixArt-α
    sec. 2.3), so a grid other than the training one reuses the trained frequencies. The first half of
    the channels encode the column, the second half the row, each as `[sin, cos]`; returned in float32.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    # positions in float32, frequencies and products in float64, as diffusers' get_2d_sincos_pos_embed
    rows = torch.arange(grid_h, device=device, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, device=device, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4))

    def axis(pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim/2)
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    col_emb = axis(cols)[None, :, :].expand(grid_h, grid_w, dim // 2)  # (h, w, dim/2)
    row_emb = axis(rows)[:, None, :].expand(grid_h, grid_w, dim // 2)
    return torch.cat([col_emb, row_emb], dim=-1).reshape(grid_h * grid_w, dim).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: a stride-p convolution, (B, C, H, W) -> (B, H/p * W/p, dim)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim), row-major over (h, w)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p), inverse of `PatchEmbed`'s token order."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(b, channels, h * p, w * p)


class TwoLayerMLP(nn.Module):
    """`linear_2(act(linear_1(x)))`: timestep / pooled / caption embedders (names as diffusers')."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int | None = None, act: str = "silu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, out_dim or hidden)
        self.act = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class FeedForward(nn.Module):
    """Transformer MLP `fc2(GELU_tanh(fc1(x)))`, hidden `mlp_ratio * dim` (DiT, PixArt, SD3)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters: adaLN supplies scale and shift."""
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift` (DiT eq. in sec. 3.2), shift/scale (B, 1, C) or (B, C) broadcast."""
    return x * (1 + scale) + shift


def split_heads(x: torch.Tensor, parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts * C) fused projection -> `parts` tensors (B, heads, N, C/heads)."""
    b, n, _ = x.shape
    x = x.view(b, n, parts, num_heads, -1)
    return tuple(y.transpose(1, 2) for y in x.unbind(2))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (SD3 sec. 5.3.2; diffusers `qk_norm="rms_norm"`), or identity."""

    def __init__(self, head_dim: int, enabled: bool) -> None:
        super().__init__()
        self.q_norm = nn.RMSNorm(head_dim, eps=NORM_EPS) if enabled else None
        self.k_norm = nn.RMSNorm(head_dim, eps=NORM_EPS) if enabled else None

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        return self._rms(q, self.q_norm), self._rms(k, self.k_norm)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        # float32 statistics whatever the autocast / weight dtype (bf16-safe); back to x's dtype for SDPA
        return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention, Q/K/V fused in one projection (with biases, as DiT/PixArt)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)  # each (B, heads, N, C/heads)
        q, k = self.norm(q, k)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to (projected) text tokens; K/V fused.
    `mask` (B, 1, 1, L) bool, True = attend."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm = QKNorm(dim // num_heads, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        (q,) = split_heads(self.q(x), 1, self.num_heads)  # (B, heads, N, C/heads)
        k, v = split_heads(self.kv(context), 2, self.num_heads)  # each (B, heads, L, C/heads)
        q, k = self.norm(q, k)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


def xavier_init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights, zero biases for every Linear (DiT / PixArt `_basic_init`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_patch_embed(embed: PatchEmbed) -> None:
    """The patch convolution initialised like a Linear layer on the flattened patch (DiT)."""
    w = embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(embed.proj.bias)


def normal_init(*layers: nn.Linear, std: float = 0.02) -> None:
    for layer in layers:
        nn.init.normal_(layer.weight, std=std)


def zero_init(*layers: nn.Linear) -> None:
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def check_inputs(name: str, cfg: Any, x, context, pooled, context_mask) -> None:
    """Forward-input checks on shapes and dtypes only (Python ints: no host syncs, nothing for torch.compile to break on)."""
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"{name} expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    p = cfg.patch_size
    if x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(
            f"{name} with patch_size={p} needs H and W divisible by {p}, got latents {tuple(x.shape[-2:])}: "
            "change the image resolution or the backbone's patch_size"
        )
    if cfg.context_dim is not None and (context is None or context.ndim != 3 or context.shape[-1] != cfg.context_dim):
        got = None if context is None else tuple(context.shape)
        raise ValueError(
            f"{name} was built with context_dim={cfg.context_dim} and needs context of shape (B, L, {cfg.context_dim}), "
            f"got {got}; set the backbone's context_dim to the text encoder's width"
        )
    if cfg.context_dim is None and context is not None:
        raise ValueError(f"{name} was built with context_dim=null (no text conditioning) but was given a context")
    if (cfg.pooled_dim is None) != (pooled is None):
        raise ValueError(
            f"{name} was built with pooled_dim={cfg.pooled_dim} but pooled is "
            f"{'missing' if pooled is None else tuple(pooled.shape)}: pass pooled (B, pooled_dim) exactly when "
            "pooled_dim is set"
        )
    if context_mask is not None and (
        context is None or context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]
    ):
        raise ValueError(
            "context_mask must be a bool tensor of shape (B, L) of the context (True = attend), got "
            f"{context_mask.dtype} {tuple(context_mask.shape)} for context {None if context is None else tuple(context.shape)}"
        )


def config_from(cls: type, config: Any, overrides: Mapping[str, Any]) -> Any:
    """`cls` from an instance, a mapping of its fields (JSON, Hydra) or None (defaults), with overrides."""
    if config is None:
        config = cls()
    elif isinstance(config, Mapping):
        config = cls(**{str(k): v for k, v in config.items()})
    elif not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {type(config).__name__}")
    if overrides:
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"unknown {cls.__name__} fields {unknown}; valid: {fields}")
        config = dataclasses.replace(config, **overrides)
    return config
