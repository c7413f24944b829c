"""DiT: agreement with diffusers' PixArtTransformer2DModel, positions, config checks (the shared backbone
properties are in test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from ldmkit.nn.backbones.dit import DiT, DiTConfig, diffusers_pixart_kwargs, state_dict_from_diffusers
from ldmkit.nn.backbones.transformer_layers import sincos_positions_2d
from tests.nn.backbones import helpers
from tests.nn.backbones.helpers import MASK, inputs

TINY = helpers.TINY["dit"]  # the properties every backbone shares are tested in test_contract.py


def pixart_pair(cfg: DiTConfig):
    """diffusers' PixArtTransformer2DModel with random weights and ldmkit's DiT loaded from it."""
    from diffusers import PixArtTransformer2DModel

    return helpers.converted_pair(lambda: PixArtTransformer2DModel(**diffusers_pixart_kwargs(cfg)), DiT(cfg),
                                  lambda state: state_dict_from_diffusers(state, cfg))


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_matches_diffusers_pixart_with_converted_weights(patch_size):
    """Numerical truth from outside: diffusers' PixArtTransformer2DModel with the same weights, on a square
    grid (the cached position table), a non-square one (PixArt's stretched positions) and a context mask."""
    cfg = DiTConfig(**{**TINY, "patch_size": patch_size})
    reference, model = pixart_pair(cfg)
    x, t, context, _ = inputs(cfg, size=(8, 12))
    with torch.no_grad():
        for xs, mask in ((x[..., :8], None), (x, MASK)):
            expected = reference(xs, context, t, encoder_attention_mask=mask).sample
            out = model(xs, t, context, None, mask)
            delta = (out - expected).abs().max().item()
            print(f"patch {patch_size}, latents {tuple(xs.shape)}: max |ldmkit - diffusers| = {delta:.2e}")
            assert delta <= 1e-5 and expected.abs().max() > 0.1


def test_sincos_positions_match_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for grid, base, scale in (((4, 4), 4, 1.0), ((3, 5), 4, 2.0)):
        expected = get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale).float()
        torch.testing.assert_close(sincos_positions_2d(32, *grid, base, scale), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DiTConfig(**{**TINY, "num_heads": 3}), "num_heads=3"),
        (lambda: DiTConfig(**{**TINY, "patch_size": 3}), "divide sample_size=8"),
        (lambda: DiTConfig(**{**TINY, "conditioning": "film"}), "not one of"),
    ],
)
def test_config_errors_say_what_to_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unsupported_pixart_checkpoints_are_refused_before_loading():
    cfg = DiTConfig(**TINY)
    reference, _ = pixart_pair(cfg)
    state = dict(reference.state_dict())
    state["adaln_single.emb.resolution_embedder.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="use_additional_conditions"):
        state_dict_from_diffusers(state, cfg)
    with pytest.raises(ValueError, match="no pooled embedding"):
        diffusers_pixart_kwargs(DiTConfig(**TINY, pooled_dim=8))
