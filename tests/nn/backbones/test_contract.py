"""What every backbone (UNet, DiT, MMDiT) must do whatever its architecture: one test body per property,
parametrised over the archs. Arch-specific behaviour (diffusers agreement, positions, streams, timesteps)
is tested in test_dit.py, test_mmdit.py and tests/nn/test_unet.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from ldmkit.lit.optim import param_groups
from ldmkit.nn.backbones import backbone_class
from tests.nn.backbones import helpers
from tests.nn.backbones.helpers import MASK, TINY, count, inputs, randomized, tiny

ARCHS = ["unet", "dit", "mmdit"]

EXPECTED_PARAMS = {
    "unet": {"tiny": 6_105_348, "small": 41_619_460, "base": 222_809_476, "sd15": 859_520_964},
    "dit": {"tiny": 3_958_084, "S": 29_989_264, "B": 118_960_912, "L": 412_603_408, "XL": 607_003_792},
    "mmdit": {"tiny": 3_513_604, "small": 111_741_968, "sd3_medium": 2_028_328_000},
}

SHAPE_CASES = [
    ("unet", {}, "base"),
    ("unet", {"attention_levels": ()}, "mid-attn-only"),
    ("unet", {"attention_levels": (1,), "num_heads": None, "head_dim": 16}, "head_dim"),
    ("unet", {"transformer_depth": 2, "pooled_dim": 12}, "depth2-pooled"),
    ("unet", {"scale_shift_norm": True, "time_embed_dim": 48}, "scale-shift"),
    ("unet", {"context_dim": None}, "unconditional"),
    ("unet", {"channel_mult": (1, 2, 2), "num_res_blocks": 2, "in_channels": 3, "out_channels": 6, "dropout": 0.1},
     "3-levels"),
    *[
        (arch, {"patch_size": p, **overrides}, f"p{p}-{name}")
        for p in (1, 2, 4)
        for arch, overrides, name in [
            ("dit", {}, "adaln-single"),
            ("dit", {"conditioning": "adaln_zero", "qk_norm": True}, "adaln-zero-qknorm"),
            ("dit", {"pooled_dim": 12, "in_channels": 3, "out_channels": 6}, "pooled-channels"),
            ("dit", {"context_dim": None}, "unconditional"),
            ("mmdit", {}, "base"),
            ("mmdit", {"qk_norm": True, "depth": 1}, "qknorm-depth1"),
            ("mmdit", {"pooled_dim": None, "in_channels": 3, "out_channels": 6}, "no-pooled-channels"),
        ]
    ],
]


@pytest.mark.parametrize("arch, overrides", [c[:2] for c in SHAPE_CASES], ids=[f"{c[0]}-{c[2]}" for c in SHAPE_CASES])
def test_output_shape(arch, overrides):
    model = randomized(tiny(arch, **overrides))
    cfg = model.config
    x, t, context, pooled = inputs(cfg, size=(8, 12))
    out = model(x, t, context, pooled)
    assert out.shape == (2, cfg.out_channels, 8, 12)
    assert torch.isfinite(out).all()
    assert (model.in_channels, model.out_channels) == (cfg.in_channels, cfg.out_channels)


@pytest.mark.parametrize("arch, overrides", [("unet", {}), ("dit", {}), ("dit", {"conditioning": "adaln_zero"}),
                                             ("mmdit", {})], ids=["unet", "dit", "dit-adaln-zero", "mmdit"])
def test_fresh_model_predicts_zero(arch, overrides):
    model = tiny(arch, **overrides)
    assert not model(*inputs(model.config)).any()  # zero-initialised output layer (LDM / ADM, DiT / PixArt, SD3)


@pytest.mark.parametrize("arch, name", [(a, n) for a in ARCHS for n in sorted(EXPECTED_PARAMS[a])])
def test_preset_parameter_counts(arch, name):
    with torch.device("meta"):
        model = backbone_class(arch).from_preset(name)
    assert count(model) == EXPECTED_PARAMS[arch][name]


@pytest.mark.parametrize("arch", ARCHS)
def test_contract_attributes(arch):
    cls = backbone_class(arch)
    size_field = {"channel_mult": (1, 2)} if arch == "unet" else {"patch_size": 2}
    model = cls(cls.presets["tiny"], pooled_dim=None, in_channels=3, out_channels=6, context_dim=40, **size_field)
    assert (model.arch, model.config_class, type(model.config)) == (arch, type(model.config), cls.config_class)
    assert (model.in_channels, model.out_channels, model.context_dim, model.pooled_dim) == (3, 6, 40, None)
    assert model.latent_size_multiple == (model.downsampling_factor if arch == "unet" else model.patch_size) == 2
    if arch != "unet":
        assert model.presets["tiny"].sample_size == 8  # the quickstart's 8x8 latents


@pytest.mark.parametrize("arch", ARCHS)
def test_context_mask_hides_tokens(arch):
    model = randomized(tiny(arch)).eval()
    helpers.check_mask_hides_tokens(model, model.config)


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_embedding_and_time_change_output_and_scalar_time_broadcasts(arch):
    model = randomized(tiny(arch, pooled_dim=12)).eval()
    x, t, context, pooled = inputs(model.config)
    with torch.no_grad():
        out = model(x, t, context, pooled)
        assert not torch.allclose(model(x, t, context, pooled + 1), out, atol=1e-4)
        assert not torch.allclose(model(x, t + 1, context, pooled), out, atol=1e-4)
        torch.testing.assert_close(model(x, 7.0, context, pooled), model(x, torch.tensor([7.0, 7.0]), context, pooled))


@pytest.mark.parametrize("arch, overrides", [
    ("unet", {"transformer_depth": 2, "pooled_dim": 12}),
    ("dit", {"pooled_dim": 12}),
    ("dit", {"pooled_dim": 12, "conditioning": "adaln_zero"}),
    ("mmdit", {"qk_norm": True}),
], ids=["unet", "dit", "dit-adaln-zero", "mmdit"])
def test_gradient_checkpointing_gives_identical_outputs_and_grads(arch, overrides):
    model = randomized(tiny(arch, **overrides))
    helpers.check_gradient_checkpointing(model, model.config)


@pytest.mark.parametrize("arch, overrides", [("unet", {}), ("dit", {"qk_norm": True}), ("mmdit", {"qk_norm": True})],
                         ids=ARCHS)
def test_bf16_autocast_forward_backward(arch, overrides):
    model = randomized(tiny(arch, **overrides))
    helpers.check_bf16_autocast(model, model.config)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_adamw_steps_fit_a_fixed_batch(arch):
    torch.manual_seed(0)
    model = tiny(arch)
    helpers.check_fits_a_fixed_batch(model, model.config)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_optimizer_group_helper_covers_every_parameter_once(arch):
    """`lit.optim.param_groups`, the one helper every stage uses: matrices and kernels decay, the rest does not."""
    model = tiny(arch, pooled_dim=12)
    decay, no_decay = param_groups(model)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


@pytest.mark.parametrize("arch, overrides", [("dit", {"depth": 2, "pooled_dim": 12}), ("mmdit", {"depth": 2})],
                         ids=["dit", "mmdit"])
def test_torch_compile_captures_one_graph(arch, overrides):
    """aot_eager traces forward and backward as inductor does (no C++ codegen); fullgraph=True fails on
    any graph break, in the block loop or elsewhere. (The UNet's, slower, is in tests/nn/test_unet.py.)"""
    model = randomized(tiny(arch, **overrides))
    helpers.check_compiled_matches_eager(model, model.config, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("arch, overrides", [("dit", {"depth": 2, "pooled_dim": 12, "qk_norm": True}),
                                             ("mmdit", {"depth": 2, "qk_norm": True})], ids=["dit", "mmdit"])
def test_torch_compile_inductor_matches_eager(arch, overrides):
    model = randomized(tiny(arch, **overrides))
    helpers.check_compiled_matches_eager(model, model.config, backend="inductor")


@pytest.mark.parametrize("arch, replace", [("unet", {"pooled_dim": 64}), ("dit", {"pooled_dim": 64}),
                                           ("mmdit", {"qk_norm": True})], ids=ARCHS)
def test_config_round_trips_through_json_and_mappings(arch, replace):
    cls = backbone_class(arch)
    cfg = dataclasses.replace(cls.presets["small" if "small" in cls.presets else "S"], **replace)
    assert cls.config_class(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert cls(TINY[arch]).config == cls(**TINY[arch]).config == cls.config_class(**TINY[arch])
    assert cls.from_preset("tiny", context_dim=512).config.context_dim == 512


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_presets_and_fields_say_what_to_fix(arch):
    cls = backbone_class(arch)
    with pytest.raises(KeyError, match="choose one of"):
        cls.from_preset("huge")
    with pytest.raises(TypeError, match=f"unknown {cls.config_class.__name__} fields"):
        cls.from_preset("tiny", channels=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_errors_say_what_to_fix(arch):
    model = tiny(arch, pooled_dim=12)
    x, t, context, pooled = inputs(model.config)
    rule = "2 levels" if arch == "unet" else "patch_size=2"
    with pytest.raises(ValueError, match=f"with {rule} needs H and W divisible by 2"):
        model(x[..., :7], t, context, pooled)
    with pytest.raises(ValueError, match="needs context of shape .* text encoder's width"):
        model(x, t, context[..., :7], pooled)
    with pytest.raises(ValueError, match="needs context of shape"):
        model(x, t, None, pooled)
    with pytest.raises(ValueError, match="pooled is missing"):
        model(x, t, context)
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        model(x, t, context, pooled, torch.ones(2, 5))
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        model(x, t, context, pooled, MASK[:, :4])


def test_backbone_modules_import_no_training_framework():
    code = (
        "import sys, ldmkit.nn.unet, ldmkit.nn.attention, ldmkit.nn.backbones.dit, ldmkit.nn.backbones.mmdit;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb', 'diffusers') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
