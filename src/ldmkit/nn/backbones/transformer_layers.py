"""Layers shared by the transformer backbones `dit.py` and `mmdit.py` (pure torch).

`TransformerBackbone` (the patch-size side of the backbone contract), patchify / unpatchify and 2-D
sin-cos positions (ViT, Dosovitskiy et al. 2021; DiT, Peebles & Xie 2023), pre-LayerNorm modulation
(adaLN, DiT sec. 3.2), the MLP and the initialisations. Attention (fused projections, optional per-head
RMS qk-norm: Dehghani et al. 2023; SD3 sec. 5.3.2) is `ldmkit.nn.attention`'s, shared with the UNet; the
time embedding and the forward-input checks are `base.py`'s, shared by every backbone.

Parameter names are ldmkit's own; `dit.py` / `mmdit.py` map diffusers' names onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.backbones.base import Backbone

TIME_FREQ_DIM = 256  # sinusoidal features fed to the timestep MLP (DiT, PixArt, SD3)
NORM_EPS = 1e-6


class TransformerBackbone(Backbone):
    """A backbone on p x p latent patches: latent H and W must be multiples of `patch_size`."""

    size_knob = "patch_size"

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def latent_size_multiple(self) -> int:
        """Latent H and W must be multiples of this (the backbone contract of ldmkit.nn.backbones)."""
        return self.config.patch_size

    def _size_rule(self) -> str:
        return f"patch_size={self.config.patch_size}"


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


def add_positions(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Patch tokens + the (float32) position table, kept in the tokens' dtype as diffusers' `PatchEmbed`
    does: under bf16 autocast the residual stream is bf16, not promoted to float32 by the table (which
    would save float32 activations for backward: +7% step memory at MMDiT-small)."""
    return (tokens + positions).to(tokens.dtype)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p), inverse of `PatchEmbed`'s token order."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(b, channels, h * p, w * p)


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
    """adaLN: `x * (1 + scale) + shift` (DiT eq. in sec. 3.2), shift/scale (B, 1, C) or (B, C) broadcast.
    One fused kernel (`addcmul`): one (B, N, C) buffer instead of two, forward and backward."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` (adaLN's gated residual) in one fused kernel, as `modulate`; gate (B, 1, C) broadcast."""
    return torch.addcmul(x, gate, y)


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
