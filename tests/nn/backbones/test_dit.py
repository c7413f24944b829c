from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from ldmkit.nn.backbones.dit import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    diffusers_pixart_kwargs,
    dit_from_preset,
    state_dict_from_diffusers,
)
from ldmkit.nn.backbones.transformer_layers import sincos_positions_2d
from tests.nn.backbones import helpers
from tests.nn.backbones.helpers import MASK, count, inputs, randomized

TINY = dict(sample_size=8, patch_size=2, width=64, depth=2, num_heads=4, context_dim=24)

EXPECTED_PARAMS = {"tiny": 3_958_084, "S": 29_989_264, "B": 118_960_912, "L": 412_603_408, "XL": 607_003_792}


def pixart_pair(cfg: DiTConfig):
    """diffusers' PixArtTransformer2DModel with random weights and ldmkit's DiT loaded from it."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    reference = randomized(PixArtTransformer2DModel(**diffusers_pixart_kwargs(cfg))).eval()
    model = DiT(cfg).eval()
    model.load_state_dict(state_dict_from_diffusers(reference.state_dict(), cfg), strict=True)
    return reference, model


@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"conditioning": "adaln_zero", "qk_norm": True}, {"pooled_dim": 12, "in_channels": 3, "out_channels": 6},
     {"context_dim": None}],
    ids=["adaln-single", "adaln-zero-qknorm", "pooled-channels", "unconditional"],
)
def test_output_shape(patch_size, overrides):
    cfg = DiTConfig(**{**TINY, "patch_size": patch_size, **overrides})
    model = randomized(DiT(cfg))
    x, t, context, pooled = inputs(cfg, size=(8, 12))
    out = model(x, t, context, pooled)
    assert out.shape == (2, cfg.out_channels, 8, 12)
    assert torch.isfinite(out).all()
    assert (model.in_channels, model.out_channels, model.patch_size) == (cfg.in_channels, cfg.out_channels, patch_size)


@pytest.mark.parametrize("conditioning", ["adaln_single", "adaln_zero"])
def test_fresh_model_predicts_zero(conditioning):
    cfg = DiTConfig(**TINY, conditioning=conditioning)
    assert not DiT(cfg)(*inputs(cfg)).any()  # zero output layer, as DiT / PixArt


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = dit_from_preset(name)
    assert count(model) == EXPECTED_PARAMS[name]


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


def test_context_mask_hides_tokens():
    cfg = DiTConfig(**TINY)
    helpers.check_mask_hides_tokens(randomized(DiT(cfg)).eval(), cfg)


def test_pooled_embedding_and_time_change_output():
    cfg = DiTConfig(**TINY, pooled_dim=12)
    model = randomized(DiT(cfg)).eval()
    x, t, context, pooled = inputs(cfg)
    with torch.no_grad():
        out = model(x, t, context, pooled)
        assert not torch.allclose(model(x, t, context, pooled + 1), out, atol=1e-4)
        assert not torch.allclose(model(x, t + 1, context, pooled), out, atol=1e-4)
        torch.testing.assert_close(model(x, 7.0, context, pooled), model(x, torch.tensor([7.0, 7.0]), context, pooled))


@pytest.mark.parametrize("conditioning", ["adaln_single", "adaln_zero"])
def test_gradient_checkpointing_gives_identical_outputs_and_grads(conditioning):
    cfg = DiTConfig(**TINY, pooled_dim=12, conditioning=conditioning)
    helpers.check_gradient_checkpointing(randomized(DiT(cfg)), cfg)


def test_bf16_autocast_forward_backward():
    cfg = DiTConfig(**TINY, qk_norm=True)
    helpers.check_bf16_autocast(randomized(DiT(cfg)), cfg)


def test_a_few_adamw_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    cfg = DiTConfig(**TINY)
    helpers.check_fits_a_fixed_batch(DiT(cfg), cfg)


@pytest.mark.slow
@pytest.mark.heavy
def test_torch_compile_inductor_matches_eager():
    cfg = DiTConfig(**{**TINY, "depth": 2, "pooled_dim": 12, "qk_norm": True})
    helpers.check_compiled_matches_eager(randomized(DiT(cfg)), cfg, backend="inductor")


def test_torch_compile_captures_one_graph():
    """aot_eager traces forward and backward as inductor does (no C++ codegen); fullgraph=True
    fails on any graph break, in the block loop or elsewhere."""
    cfg = DiTConfig(**{**TINY, "depth": 2, "pooled_dim": 12})
    helpers.check_compiled_matches_eager(randomized(DiT(cfg)), cfg, backend="aot_eager")


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_backbone_contract_attributes(arch):
    from ldmkit.nn.backbones.mmdit import MMDiT

    cls = DiT if arch == "dit" else MMDiT
    model = cls(cls.presets["tiny"], patch_size=2, pooled_dim=None, in_channels=3, out_channels=6, context_dim=40)
    assert (model.arch, model.config_class, type(model.config)) == (arch, type(model.config), cls.config_class)
    assert (model.in_channels, model.out_channels, model.context_dim, model.pooled_dim) == (3, 6, 40, None)
    assert model.latent_size_multiple == model.patch_size == 2
    assert model.presets["tiny"].sample_size == 8  # the quickstart's 8x8 latents


def test_config_round_trips_through_json_and_mappings():
    cfg = dataclasses.replace(DIT_PRESETS["S"], pooled_dim=64)
    assert DiTConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert DiT(TINY).config == DiT(**TINY).config == DiTConfig(**TINY)
    assert dit_from_preset("tiny", context_dim=512).config.context_dim == 512


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: dit_from_preset("huge"), "choose one of"),
        (lambda: dit_from_preset("tiny", channels=3), "unknown DiTConfig fields"),
        (lambda: DiTConfig(**{**TINY, "num_heads": 3}), "num_heads=3"),
        (lambda: DiTConfig(**{**TINY, "patch_size": 3}), "divide sample_size=8"),
        (lambda: DiTConfig(**{**TINY, "conditioning": "film"}), "not one of"),
    ],
)
def test_config_errors_say_what_to_fix(build, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        build()


def test_forward_errors_say_what_to_fix():
    cfg = DiTConfig(**TINY, pooled_dim=12)
    model = DiT(cfg)
    x, t, context, pooled = inputs(cfg)
    with pytest.raises(ValueError, match="patch_size=2 needs H and W divisible by 2"):
        model(x[..., :7], t, context, pooled)
    with pytest.raises(ValueError, match="needs context of shape .* text encoder's width"):
        model(x, t, context[..., :20], pooled)
    with pytest.raises(ValueError, match="pooled is missing"):
        model(x, t, context)
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        model(x, t, context, pooled, torch.ones(2, 5))


def test_unsupported_pixart_checkpoints_are_refused_before_loading():
    cfg = DiTConfig(**TINY)
    reference, _ = pixart_pair(cfg)
    state = dict(reference.state_dict())
    state["adaln_single.emb.resolution_embedder.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="use_additional_conditions"):
        state_dict_from_diffusers(state, cfg)
    with pytest.raises(ValueError, match="no pooled embedding"):
        diffusers_pixart_kwargs(DiTConfig(**TINY, pooled_dim=8))


def test_backbone_modules_import_no_training_framework():
    code = (
        "import sys, ldmkit.nn.backbones.dit, ldmkit.nn.backbones.mmdit;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb', 'diffusers') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
