"""Attention layers of the text-conditioned UNet (pure torch).

The transformer block is the one of LDM/Stable Diffusion (Rombach et al. 2022,
`ldm/modules/attention.py` `BasicTransformerBlock` / `SpatialTransformer`): pre-LayerNorm
self-attention, cross-attention over the text tokens and a GEGLU feed-forward (Shazeer 2020),
each residual. All attention goes through `F.scaled_dot_product_attention`, so the backend
(flash / memory-efficient / CPU flash) is picked by torch.

Masks follow SDPA and tokenizers: `True` marks a context token that may be attended to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.nn.blocks import group_norm, zero_module


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)  # (B, heads, N, C/heads)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (one matmul instead of three)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        b, n, c = x.shape
        # unbind on dim 2: in backward the three grads are stacked straight into the (B, N, 3C) layout
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = (y.transpose(1, 2) for y in qkv.unbind(2))  # each (B, heads, N, C/heads)
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to context tokens, keys and values fused in one projection.

    `mask` is a bool tensor broadcastable to (B, heads, N, L), usually (B, 1, 1, L); `True` = attend.
    A sample whose tokens are all masked gets a zero attention output (SDPA's safe softmax).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length, _ = context.shape
        c = x.shape[-1]
        q = _split_heads(self.q(x), self.num_heads)  # (B, heads, N, C/heads)
        kv = self.kv(context).view(b, length, 2, self.num_heads, c // self.num_heads)
        k, v = (y.transpose(1, 2) for y in kv.unbind(2))  # each (B, heads, L, C/heads)
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class GEGLUFeedForward(nn.Module):
    """`W_out (a * GELU(g))` with `[a, g] = W_in x` (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)  # each (B, N, mult*C)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention → cross-attention (when `context_dim`) → GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, num_heads)
        if context_dim is None:
            self.norm2 = self.attn2 = None
        else:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H*W positions of a feature map, residual around the whole stack.

    `proj_in`/`proj_out` are linear maps over channels. SD1's 1x1 convolutions compute the same map
    (SD2 switched to `nn.Linear`), so one layout serves both; `proj_out` starts at zero so the
    block starts as the identity.
    """

    def __init__(
        self, channels: int, num_heads: int, context_dim: int | None, depth: int = 1, num_groups: int = 32
    ) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, height, width = x.shape
        # reshape, not view: a no-copy view for channels_last inputs, one copy for contiguous ones
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, HW, C)
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context, mask)
        h = self.proj_out(h).view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides
        return x + h  # `x` first: the sum takes x's memory format
