from __future__ import annotations

import math

import pytest
import torch

from ldmkit.nn.attention import CrossAttention, SelfAttention, SpatialTransformer, TransformerBlock


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out (Vaswani et al. 2017, Eq. 1). (B, N, C) inputs."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, c)


def test_self_attention_matches_the_textbook_formula():
    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=4)
    x = torch.randn(2, 10, 32)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    expected = attn.out(reference_attention(x @ wq.T, x @ wk.T, x @ wv.T, heads=4))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_matches_the_textbook_formula_and_mask_hides_tokens():
    torch.manual_seed(0)
    attn = CrossAttention(32, context_dim=12, num_heads=2)
    x, context = torch.randn(2, 9, 32), torch.randn(2, 6, 12)
    wk, wv = attn.kv.weight.chunk(2)
    expected = attn.out(reference_attention(attn.q(x), context @ wk.T, context @ wv.T, heads=2))
    torch.testing.assert_close(attn(x, context), expected, rtol=1e-5, atol=1e-5)

    keep = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    masked = attn(x, context, keep[:, None, None, :])
    # sample 0 sees exactly its first three tokens
    torch.testing.assert_close(masked[0], attn(x[:1], context[:1, :3])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[1], expected[1], rtol=1e-5, atol=1e-5)


def test_fully_masked_sample_gets_no_attention_output():
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=8, num_heads=2)
    x, context = torch.randn(1, 4, 16), torch.randn(1, 3, 8)
    out = attn(x, context, torch.zeros(1, 1, 1, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attn.out.bias.expand_as(out))


def test_transformer_block_without_context_dim_is_self_attention_only():
    block = TransformerBlock(16, num_heads=2, context_dim=None)
    assert block.attn2 is None
    assert block(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_spatial_transformer_starts_as_identity_and_keeps_channels_last():
    torch.manual_seed(0)
    st = SpatialTransformer(32, num_heads=2, context_dim=8, depth=2)
    x, context = torch.randn(2, 32, 4, 6), torch.randn(2, 3, 8)
    torch.testing.assert_close(st(x, context), x)  # proj_out is zero-initialised
    torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    out = st(x, context)
    assert not torch.allclose(out, x)
    out_cl = st(x.contiguous(memory_format=torch.channels_last), context)
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        SelfAttention(32, num_heads=3)
