"""MMDiT: agreement with diffusers' SD3Transformer2DModel, the joint streams, config checks (the shared
backbone properties are in test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from ldmkit.nn.backbones.mmdit import (
    MMDIT_PRESETS,
    MMDiT,
    MMDiTConfig,
    diffusers_sd3_kwargs,
    mmdit_from_preset,
    state_dict_from_diffusers,
)
from tests.nn.backbones import helpers
from tests.nn.backbones.helpers import count, inputs, randomized

TINY = helpers.TINY["mmdit"]

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (architecture fields).
SD3_MEDIUM_DIFFUSERS_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)


def sd3_pair(cfg: MMDiTConfig):
    """diffusers' SD3Transformer2DModel with random weights and ldmkit's MMDiT loaded from it."""
    from diffusers import SD3Transformer2DModel

    return helpers.converted_pair(lambda: SD3Transformer2DModel(**diffusers_sd3_kwargs(cfg)), MMDiT(cfg),
                                  lambda state: state_dict_from_diffusers(state, cfg))


def test_last_text_stream_is_context_only():
    cfg = MMDiTConfig(**TINY)
    model = MMDiT(cfg)
    *body, last = model.blocks
    assert last.text.out is None and last.text.mlp is None and last.text.modulation.out_features == 2 * cfg.width
    assert all(b.text.out is not None and b.text.mlp is not None for b in body)


def test_sd3_medium_preset_has_the_parameter_count_of_diffusers_sd3_medium():
    from diffusers import SD3Transformer2DModel

    assert diffusers_sd3_kwargs(MMDIT_PRESETS["sd3_medium"]) == {**SD3_MEDIUM_DIFFUSERS_CONFIG, "qk_norm": None}
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**SD3_MEDIUM_DIFFUSERS_CONFIG)
        ours = mmdit_from_preset("sd3_medium")
    print(f"parameters: ldmkit MMDiT sd3_medium {count(ours):,}, diffusers SD3Transformer2DModel {count(reference):,}")
    assert count(ours) == count(reference) == 2_028_328_000
    mapped = state_dict_from_diffusers(reference.state_dict(), ours.config)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("patch_size, qk_norm", [(1, False), (2, True), (4, False)])
def test_matches_diffusers_sd3_with_converted_weights(patch_size, qk_norm):
    """Numerical truth from outside: diffusers' SD3Transformer2DModel with the same weights, on a square and a
    non-square latent grid (centre crops of the position table)."""
    cfg = MMDiTConfig(**{**TINY, "patch_size": patch_size, "qk_norm": qk_norm})
    reference, model = sd3_pair(cfg)
    x, t, context, pooled = inputs(cfg, size=(8, 12))
    with torch.no_grad():
        for xs in (x[..., :8], x):
            expected = reference(xs, context, pooled, t).sample
            out = model(xs, t, context, pooled)
            delta = (out - expected).abs().max().item()
            print(f"patch {patch_size}, qk_norm {qk_norm}, latents {tuple(xs.shape)}: max |ldmkit - diffusers| = {delta:.2e}")
            assert delta <= 1e-5 and expected.abs().max() > 0.1


def test_bf16_autocast_keeps_the_image_stream_in_bf16_and_matches_diffusers_sd3():
    """Under bf16 autocast the image stream stays in the patch embedding's dtype after the (float32) positions
    are added, as in diffusers; promoted to float32 it saved float32 activations for backward (+7% step memory
    at `small`) and the outputs differed by up to 1.6e-2 from diffusers' at this size. What remains is rounding:
    the gated residuals are one fused multiply-add (`addcmul`, rounded once) where diffusers rounds the product
    and the sum to bf16 separately, so the outputs may differ by about one bf16 step (measured: 2^-7)."""
    cfg = MMDiTConfig(**TINY)
    reference, model = sd3_pair(cfg)
    x, t, context, pooled = inputs(cfg)
    stream_dtypes = []
    hooks = [block.register_forward_hook(lambda m, args, out: stream_dtypes.append(out[0].dtype)) for block in model.blocks]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x, context, pooled, t).sample
        out = model(x, t, context, pooled)
    for hook in hooks:
        hook.remove()
    assert stream_dtypes == [torch.bfloat16] * cfg.depth
    assert out.dtype == expected.dtype == torch.bfloat16 and expected.abs().max() > 0.1
    delta = (out.float() - expected.float()).abs().max().item()
    print(f"bf16 autocast: max |ldmkit - diffusers| = {delta:.2e}, |output| <= {expected.abs().max().item():.2f}")
    assert delta <= 2**-7


def test_all_true_mask_is_no_mask():
    cfg = MMDiTConfig(**TINY)
    model = randomized(MMDiT(cfg)).eval()
    x, t, context, pooled = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context, pooled, torch.ones(2, 5, dtype=torch.bool)),
                                   model(x, t, context, pooled), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MMDiTConfig(**{**TINY, "num_heads": 3}), "num_heads=3"),
        (lambda: MMDiTConfig(**{**TINY, "context_dim": None}), "attends jointly to text tokens"),
        (lambda: MMDiTConfig(**{**TINY, "pos_embed_max_size": 3}), "smaller than sample_size"),
    ],
)
def test_config_errors_say_what_to_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_latents_larger_than_the_position_table_say_what_to_fix():
    cfg = MMDiTConfig(**TINY)
    _, t, context, pooled = inputs(cfg)
    with pytest.raises(ValueError, match="larger than the position table's 16x16 .*raise pos_embed_max_size"):
        MMDiT(cfg)(torch.randn(1, 4, 34, 8), t[:1], context[:1], pooled[:1])


def test_dual_attention_checkpoints_are_refused_before_loading():
    cfg = MMDiTConfig(**TINY)
    state = {"context_embedder.weight": torch.zeros(cfg.width, cfg.context_dim),
             "transformer_blocks.0.attn2.to_q.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="dual-attention"):
        state_dict_from_diffusers(state, cfg)
    with pytest.raises(ValueError, match="width is 64"):
        state_dict_from_diffusers({"context_embedder.weight": torch.zeros(32, 24)}, cfg)
