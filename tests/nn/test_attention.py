from __future__ import annotations

import math

import pytest
import torch

import ldmkit.nn.attention as attention_module
from ldmkit.nn.attention import CrossAttention, SelfAttention, SpatialTransformer, TransformerBlock, attention, split_heads


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


# --- `attention`: bf16 on the CPU takes ldmkit's `_BF16CpuAttention` (bench/bf16_cpu_attention.py) ---


def _bf16_case(n: int, length: int, mask_kind: str, seed: int = 0, heads: int = 3, d: int = 16, logit_scale: float = 3.0):
    """bf16 q/k/v as the backbones hand them (views of fused projections), an output gradient and a mask."""
    gen = torch.Generator().manual_seed(seed)
    b = 3
    q_proj = (torch.randn(b, n, 3 * heads * d, generator=gen) * torch.tensor([logit_scale, 1, 1]).repeat_interleave(heads * d))
    kv_proj = torch.randn(b, length, 2 * heads * d, generator=gen)
    grad = torch.randn(b, heads, n, d, generator=gen).to(torch.bfloat16)
    mask = None
    if mask_kind == "keys":  # (B, 1, 1, L); sample 2 attends to nothing
        mask = torch.rand(b, 1, 1, length, generator=gen) > 0.4
        mask[0, ..., 0] = True
        mask[2] = False
    elif mask_kind == "per_query":  # (B, 1, N, L)
        mask = torch.rand(b, 1, n, length, generator=gen) > 0.3
    return q_proj.to(torch.bfloat16), kv_proj.to(torch.bfloat16), grad, mask, heads


def _attend(fn, q_proj, kv_proj, grad, mask, heads, dtype):
    """fn(q, k, v, mask) on fresh leaves in `dtype` -> [output, grad of the q projection, grad of the kv projection]."""
    q_leaf, kv_leaf = (x.detach().to(dtype, copy=True).requires_grad_() for x in (q_proj, kv_proj))
    (q, _, _), (k, v) = split_heads(q_leaf, 3, heads), split_heads(kv_leaf, 2, heads)
    out = fn(q, k, v, mask)
    out.backward(grad.to(dtype))
    return out, [out.detach(), q_leaf.grad, kv_leaf.grad]


def _sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _rel_errors(got, ref):
    return [((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(got, ref, strict=True)]


@pytest.mark.parametrize("mask_kind", ["none", "keys", "per_query"])
@pytest.mark.parametrize("n,length", [(40, 33), (17, 64)])
def test_bf16_cpu_attention_is_about_as_close_to_float64_attention_as_sdpa(n, length, mask_kind):
    """Output and input gradients against float64 SDPA on the same bf16 numbers: the bf16 path's relative error is
    under 5e-3 and within 1.5x torch's SDPA in bf16 (measured 0.9-1.3x: both round outputs and gradients to bf16)."""
    case = _bf16_case(n, length, mask_kind)
    out, ours = _attend(attention, *case, dtype=torch.bfloat16)
    assert out.grad_fn.name() == "_BF16CpuAttentionBackward"
    _, sdpa = _attend(_sdpa, *case, dtype=torch.bfloat16)
    _, ref = _attend(_sdpa, *case, dtype=torch.float64)
    ours_err, sdpa_err = _rel_errors(ours, ref), _rel_errors(sdpa, ref)
    print(f"relative error out / dq-proj / dkv-proj: ours {ours_err}, sdpa {sdpa_err}")
    for mine, theirs in zip(ours_err, sdpa_err, strict=True):
        assert mine <= 1.5 * theirs and mine < 5e-3


@pytest.mark.parametrize("mask_kind", ["none", "keys"])
def test_bf16_cpu_attention_chunks_do_not_change_the_numbers(monkeypatch, mask_kind):
    """The (batch x heads) matrices in one chunk or in chunks of two (9 = 2+2+2+2+1): bit-identical results."""
    case = _bf16_case(40, 33, mask_kind)
    _, whole = _attend(attention, *case, dtype=torch.bfloat16)
    monkeypatch.setattr(attention_module, "_CHUNK_SCORE_BYTES", 4 * 40 * 33 * 2)
    assert attention_module._chunks(9, 40 * 33) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    _, chunked = _attend(attention, *case, dtype=torch.bfloat16)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


def test_bf16_cpu_attention_gives_a_fully_masked_sample_zero_output_and_gradients():
    q_proj, kv_proj, grad, mask, heads = _bf16_case(8, 5, "keys")
    out, (_, dq, dkv) = _attend(attention, q_proj, kv_proj, grad, mask, heads, dtype=torch.bfloat16)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dkv).all()
    assert out[2].abs().max() == 0 and dq[2].abs().max() == 0 and dkv[2].abs().max() == 0
    assert out[0].abs().max() > 0 and dkv[0].abs().max() > 0


def test_attention_takes_the_bf16_path_only_for_short_bf16_cpu_attention(monkeypatch):
    """fp32, float masks and sequences past BF16_CPU_ATTENTION_MAX_SCORES go to SDPA, unchanged (bit-equal)."""
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    assert torch.equal(attention(q, k, v), _sdpa(q, k, v, None))
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    assert attention(qb, kb, vb).grad_fn.name() == "_BF16CpuAttentionBackward"
    float_mask = torch.zeros(2, 1, 1, 6, dtype=torch.bfloat16)
    assert torch.equal(attention(qb, kb, vb, float_mask), _sdpa(qb, kb, vb, float_mask))
    monkeypatch.setattr(attention_module, "BF16_CPU_ATTENTION_MAX_SCORES", 6 * 6 - 1)
    assert torch.equal(attention(qb, kb, vb), _sdpa(qb, kb, vb, None))


def test_bf16_cpu_attention_under_autocast_computes_the_same_numbers():
    """Autocast (as in a bf16-mixed training step) must not run the float32 logits' matmul in bf16: with it on, the
    output and gradients are bit-identical to the ones without (measured before the fix: 3x the error)."""
    case = _bf16_case(40, 33, "keys", logit_scale=6.0)
    _, plain = _attend(attention, *case, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, autocast = _attend(attention, *case, dtype=torch.bfloat16)
    for a, b in zip(plain, autocast, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(40, 33), (1, 40, 33), (3, 1, 40, 33)])
def test_bf16_cpu_attention_takes_masks_of_any_broadcastable_shape(shape):
    q_proj, kv_proj, grad, _, heads = _bf16_case(40, 33, "none")
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.3
    _, ours = _attend(attention, q_proj, kv_proj, grad, mask, heads, dtype=torch.bfloat16)
    _, ref = _attend(_sdpa, q_proj, kv_proj, grad, mask, heads, dtype=torch.float64)
    assert max(_rel_errors(ours, ref)) < 5e-3
