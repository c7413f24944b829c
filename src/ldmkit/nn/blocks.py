"""Convolutional building blocks shared by the autoencoder and the UNet (pure torch).

The ResNet block, resampling layers and spatial self-attention follow the LDM/SD
autoencoder (Rombach et al. 2022, `ldm/modules/diffusionmodules/model.py`) and
ADM's UNet (Dhariwal & Nichol 2021): GroupNorm + SiLU pre-activation, an optional
embedding (e.g. the diffusion timestep) added or applied as scale/shift.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, num_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with at most `num_groups` groups; fewer when `channels` is not a multiple (small nets)."""
    groups = math.gcd(channels, num_groups)
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (ADM, Sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm → SiLU → conv, twice, with an optional embedding.

    With `emb_channels`, the embedding is projected and either added between the two
    convolutions or, with `scale_shift_norm=True`, applied as `norm(h) * (1 + scale) + shift`
    (ADM's AdaGN).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        emb_channels: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        scale_shift_norm: bool = False,
        zero_init: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.scale_shift_norm = scale_shift_norm
        self.norm1 = group_norm(in_channels, num_groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if emb_channels is not None:
            self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if scale_shift_norm else 1))
        else:
            self.emb_proj = None
        self.norm2 = group_norm(out_channels, num_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.emb_proj is None:
            h = self.norm2(h)
        else:
            if emb is None:
                raise ValueError("this ResnetBlock was built with emb_channels and needs an embedding: call block(x, emb)")
            e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)  # (B, C_out or 2*C_out, 1, 1)
            if self.scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)  # LDM/ADM add the embedding before the second norm
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 convolution, or 2x2 average pooling without `with_conv`.

    `asymmetric_pad=True` pads one pixel right and bottom only before an unpadded convolution, as
    LDM's / Stable Diffusion's autoencoder does (`model.py` `Downsample`); the default pads all sides.
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, with_conv: bool = True, asymmetric_pad: bool = False
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not with_conv and out_channels != channels:
            raise ValueError(f"Downsample without a conv cannot change channels ({channels} → {out_channels})")
        self.asymmetric_pad = asymmetric_pad and with_conv
        padding = 0 if self.asymmetric_pad else 1
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour interpolation, then an optional 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None, with_conv: bool = True) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not with_conv and out_channels != channels:
            raise ValueError(f"Upsample without a conv cannot change channels ({channels} → {out_channels})")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class SpatialSelfAttention(nn.Module):
    """Residual multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32, zero_init: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SpatialSelfAttention: channels {channels} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        if zero_init:
            zero_module(self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        # contiguous: SDPA's fused (flash) kernels need a dense last dim; on the strided view they fall
        # back to the math path, which materialises the HW x HW attention matrix (1.75x slower fwd+bwd
        # at 64x64 positions on CPU, see BENCHMARKS.md)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3).contiguous()
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)
