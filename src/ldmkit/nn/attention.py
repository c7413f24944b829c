"""Attention layers of the backbones (pure torch): the UNet's spatial transformer, and the self- and
cross-attention with optional qk-norm that DiT and MMDiT use as well.

The transformer block is the one of LDM/Stable Diffusion (Rombach et al. 2022,
`ldm/modules/attention.py` `BasicTransformerBlock` / `SpatialTransformer`): pre-LayerNorm
self-attention, cross-attention over the text tokens and a GEGLU feed-forward (Shazeer 2020),
each residual. All attention goes through `attention`: `F.scaled_dot_product_attention` (backend
picked by torch: flash / memory-efficient / CPU flash), except bf16 on the CPU up to 512 x 512 scores
per head, where torch's CPU flash kernel is 1.4-2.4x slower than bf16 matmuls around a float32
softmax (`_BF16CpuAttention`; bench/bf16_cpu_attention.py).

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


# Attention with at most this many query x key positions per head takes `_BF16CpuAttention` on the CPU in bf16
# (0: never). Measured on the project's 2-core AVX512-BF16 EPYC, torch 2.15, 6 heads of 64, forward + backward
# (bench/bf16_cpu_attention.py, BENCHMARKS.md): 2.0-2.4x SDPA's speed up to 256 x 77, 1.4-1.6x at 256 x 256 to
# 512 x 512, 1.0-1.2x at 1024 x 1024. The cap is for memory: it saves the bf16 probabilities for backward
# (2 bytes per score; SDPA saves one float per query), which grow with N x L while its lead shrinks.
BF16_CPU_ATTENTION_MAX_SCORES = 512 * 512


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) queries and (B, heads, L, d) keys/values; `mask` a bool
    tensor broadcastable to (B, heads, N, L), True = attend (or SDPA's additive float mask); a query with no key
    to attend gets a zero output.

    `F.scaled_dot_product_attention`, except for bf16 on the CPU with at most `BF16_CPU_ATTENTION_MAX_SCORES`
    scores per head: there torch's CPU flash kernel is 1.4-2.4x slower than `_BF16CpuAttention` (bf16 matmuls
    around a float32 softmax; error against float64 attention 0.9-1.3x SDPA's), which saves more for backward."""
    if (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and k.dtype == v.dtype == torch.bfloat16
        and q.shape[-2] * k.shape[-2] <= BF16_CPU_ATTENTION_MAX_SCORES
        and (mask is None or mask.dtype == torch.bool)
    ):
        return _BF16CpuAttention.apply(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# `_BF16CpuAttention` works through the (batch x heads) attention matrices in chunks of about this many bytes of
# float32 scores, so that its temporaries stay in cache.
_CHUNK_SCORE_BYTES = 2**21


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, heads, N, d) -> a contiguous (B * heads, N, d) copy (or view, when it already is one) in `dtype`."""
    return x.to(dtype, memory_format=torch.contiguous_format).flatten(0, 1)


class _BF16CpuAttention(torch.autograd.Function):
    """Attention for bf16 q, k, v on the CPU: float32 logits (from float32 copies of q and k: bf16 products are
    exact in float32, as in a bf16 matmul accumulating in float32) and softmax, the probabilities rounded to bf16
    for the bf16 matmul with v (torch's CPU flash kernel likewise rounds its exponentials to bf16 for that matmul).
    Masked keys get -inf; a query with no key to attend gets zero weights (SDPA's safe softmax). Saves the bf16
    probabilities (B*heads*N*L*2 bytes) for backward instead of recomputing them; backward: dv = p^T do,
    dp = do v^T in float32, ds = p (dp - rowsum(p dp)) / sqrt(d), dq = ds k, dk = ds^T q (bf16 matmuls, float32
    accumulation). Both passes go through the (batch x heads) matrices `_CHUNK_SCORE_BYTES` of
    float32 scores at a time: at DiT / MMDiT sizes the page faults and cache misses of whole-tensor temporaries
    cost as much as the arithmetic."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # noqa: ANN001, ANN205
        with torch.autocast("cpu", enabled=False):  # autocast would run the float32 logits' bmm in bf16
            return _BF16CpuAttention._forward(ctx, q, k, v, mask)

    @staticmethod
    def _forward(ctx, q, k, v, mask):  # noqa: ANN001, ANN205
        b, h, n, d = q.shape
        length = k.shape[-2]
        q32, k32, v16 = _flat(q, torch.float32), _flat(k, torch.float32), _flat(v, v.dtype)
        if mask is not None:  # broadcastable to (B, heads, N, L) -> (B * heads, 1 or N, L)
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            mask = mask.expand(b, h, mask.shape[-2], length).reshape(b * h, mask.shape[-2], length)
        probs = q.new_empty(b * h, n, length)
        out = q.new_empty(b * h, n, d)
        scale = d**-0.5
        for i, j in _chunks(b * h, n * length):
            scores = torch.bmm(q32[i:j], k32[i:j].transpose(1, 2)).mul_(scale)
            if mask is not None:
                scores = scores.masked_fill_(~mask[i:j], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            if mask is not None:  # softmax over all -inf is NaN; SDPA's safe softmax gives the row zero weights
                p = p.masked_fill_(~mask[i:j].any(-1, keepdim=True), 0.0)
            probs[i:j].copy_(p)
            torch.bmm(probs[i:j], v16[i:j], out=out[i:j])
        ctx.save_for_backward(q, k, v, probs)
        return out.view(b, h, n, d)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        with torch.autocast("cpu", enabled=False):  # a backward called inside autocast: the same float32 math
            return _BF16CpuAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, probs = ctx.saved_tensors
        b, h, n, d = q.shape
        length = k.shape[-2]
        q16, k16, v32 = _flat(q, q.dtype), _flat(k, k.dtype), _flat(v, torch.float32)
        g16 = _flat(grad_out, grad_out.dtype)
        g32 = g16.float()
        grad_q, grad_k, grad_v = torch.empty_like(q16), torch.empty_like(k16), k16.new_empty(b * h, length, d)
        for i, j in _chunks(b * h, n * length):
            torch.bmm(probs[i:j].transpose(1, 2), g16[i:j], out=grad_v[i:j])
            dp = torch.bmm(g32[i:j], v32[i:j].transpose(1, 2))
            ds = dp.sub_((dp * probs[i:j]).sum(-1, keepdim=True)).mul_(probs[i:j])  # p (dp - rowsum(p dp))
            ds = ds.to(q.dtype)  # ds * sqrt(d): the scale goes on the (smaller) gradients below
            torch.bmm(ds, k16[i:j], out=grad_q[i:j])
            torch.bmm(ds.transpose(1, 2), q16[i:j], out=grad_k[i:j])
        scale = d**-0.5
        grad_q, grad_k = grad_q.mul_(scale), grad_k.mul_(scale)
        return grad_q.view(b, h, n, d), grad_k.view(b, h, length, d), grad_v.view(b, h, length, d), None


def _chunks(total: int, scores_per_item: int):
    """[i, j) ranges over `total` attention matrices, about `_CHUNK_SCORE_BYTES` of float32 scores each."""
    step = max(1, _CHUNK_SCORE_BYTES // (4 * scores_per_item))
    return [(i, min(i + step, total)) for i in range(0, total, step)]


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
        return self.out(merge_heads(attention(q, k, v)))


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
        return self.out(merge_heads(attention(q, k, v, mask)))


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
