"""Attention layers of the backbones (pure torch): the UNet's spatial transformer, and the self- and
cross-attention with optional qk-norm that DiT and MMDiT use as well.

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


def split_heads(x: torch.Tensor, parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts * C) fused projection -> `parts` tensors (B, heads, N, C/heads). Unbound on dim 2 (views,
    no copy): in backward the `parts` gradients are stacked straight into the fused (B, N, parts * C) layout."""
    b, n, _ = x.shape
    x = x.view(b, n, parts, num_heads, -1)
    return tuple(y.transpose(1, 2) for y in x.unbind(2))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (SD3 sec. 5.3.2; diffusers `qk_norm="rms_norm"`), or the identity."""

    def __init__(self, head_dim: int, enabled: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.q_norm = nn.RMSNorm(head_dim, eps=eps) if enabled else None
        self.k_norm = nn.RMSNorm(head_dim, eps=eps) if enabled else None

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        return self._rms(q, self.q_norm), self._rms(k, self.k_norm)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        # float32 statistics whatever the autocast / weight dtype (bf16-safe); back to x's dtype for SDPA
        return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps).to(x.dtype)


def _check_heads(name: str, dim: int, num_heads: int) -> None:
    if dim % num_heads:
        raise ValueError(f"{name}: dim {dim} is not divisible by num_heads {num_heads}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (one matmul instead of three); optional
    per-head RMS qk-norm. `bias`: LDM/SD have no Q/K/V biases, DiT/PixArt do."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, bias: bool = False) -> None:
        super().__init__()
        _check_heads("SelfAttention", dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.norm = QKNorm(dim // num_heads, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        q, k, v = split_heads(self.qkv(x), 3, self.num_heads)  # each (B, heads, N, C/heads)
        q, k = self.norm(q, k)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to context tokens, keys and values fused in one projection.

    `mask` is a bool tensor broadcastable to (B, heads, N, L), usually (B, 1, 1, L); `True` = attend.
    A sample whose tokens are all masked gets a zero attention output (SDPA's safe softmax).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool = False, bias: bool = False) -> None:
        super().__init__()
        _check_heads("CrossAttention", dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.norm = QKNorm(dim // num_heads, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        (q,) = split_heads(self.q(x), 1, self.num_heads)  # (B, heads, N, C/heads)
        k, v = split_heads(self.kv(context), 2, self.num_heads)  # each (B, heads, L, C/heads)
        q, k = self.norm(q, k)
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


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
