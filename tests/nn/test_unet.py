"""UNet: agreement with diffusers' UNet2DConditionModel, timesteps, channels_last, compile, config checks
(the properties every backbone shares are tested in tests/nn/backbones/test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from ldmkit.nn.unet import (
    UNet,
    UNetConfig,
    diffusers_unet_kwargs,
    state_dict_from_diffusers,
    timestep_embedding,
    unet_from_preset,
)
from tests.nn.backbones.helpers import TINY as BACKBONES_TINY
from tests.nn.backbones.helpers import count

# A few-thousand-parameter config that still exercises every block type.
TINY = BACKBONES_TINY["unet"]

# runwayml/stable-diffusion-v1-5 unet/config.json (architecture fields).
SD15_DIFFUSERS_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)


def randomized(model: UNet, seed: int = 0) -> UNet:
    """Replace the zero init (output convs, proj_out) with noise so every input reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def inputs(cfg: UNetConfig, batch: int = 2, size: tuple[int, int] = (8, 8), length: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = None if cfg.context_dim is None else torch.randn(batch, length, cfg.context_dim, generator=gen)
    pooled = None if cfg.pooled_dim is None else torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, context, pooled


def test_sd15_preset_matches_diffusers_parameter_count():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        reference = UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
        ours = unet_from_preset("sd15")
    assert abs(count(ours) - count(reference)) <= 0.005 * count(reference)
    assert count(reference) == 859_520_964


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_heads": None, "head_dim": 8, "transformer_depth": 2, "pooled_dim": 12, "scale_shift_norm": True}],
    ids=["sd-like", "depth2-pooled-scaleshift"],
)
def test_matches_diffusers_with_converted_weights(overrides):
    """Numerical truth from outside: diffusers' UNet2DConditionModel with the same weights."""
    from diffusers import UNet2DConditionModel

    cfg = UNetConfig(**{**TINY, "channel_mult": (1, 2, 2), "attention_levels": (0, 2), **overrides})
    torch.manual_seed(0)
    kwargs = diffusers_unet_kwargs(cfg) | {"use_linear_projection": False}  # SD1 layout: 1x1-conv proj_in/out
    reference = UNet2DConditionModel(**kwargs).eval()
    model = UNet(cfg).eval()
    model.load_state_dict(state_dict_from_diffusers(reference.state_dict()), strict=True)
    x, _, context, pooled = inputs(cfg)
    t = torch.tensor([12.5, 901.0])
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    with torch.no_grad():
        expected = reference(x, t, context, class_labels=pooled, encoder_attention_mask=mask).sample
        torch.testing.assert_close(model(x, t, context, pooled, mask), expected, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_output():
    cfg = UNetConfig(**{**TINY, "channel_mult": (1, 2, 2)})
    model = randomized(UNet(cfg)).eval()
    x, t, context, _ = inputs(cfg)
    with torch.no_grad():
        expected = model(x, t, context)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_float_and_long_timesteps_agree_and_fractional_ones_interpolate():
    cfg = UNetConfig(**TINY)
    model = randomized(UNet(cfg)).eval()
    x, _, context, _ = inputs(cfg)
    with torch.no_grad():
        at = {t: model(x, torch.tensor([t, t]), context) for t in (10, 10.0, 10.5, 11)}
        torch.testing.assert_close(at[10], at[10.0], rtol=0, atol=0)
        assert not torch.allclose(at[10.5], at[10]) and not torch.allclose(at[10.5], at[11])
        torch.testing.assert_close(model(x, torch.tensor(10), context), at[10])  # scalar t broadcasts
        torch.testing.assert_close(model(x, 10, context), at[10])


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2 * freqs), torch.sin(2 * freqs)]))


def test_config_takes_hydra_lists_and_keyword_arguments():
    as_lists = {**TINY, "channel_mult": [1, 2], "attention_levels": [1, 0]}
    assert UNet(as_lists).config == UNet(**as_lists).config == UNet.from_kwargs(**TINY).config == UNetConfig(**TINY)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: UNetConfig(**{**TINY, "num_heads": 3}), "not divisible by num_heads=3"),
        (lambda: UNetConfig(**{**TINY, "head_dim": 16}), "exactly one of num_heads"),
        (lambda: UNetConfig(**{**TINY, "attention_levels": (2,)}), "outside 0..1"),
        (lambda: UNetConfig(**{**TINY, "norm_eps": 0}), "norm_eps must be > 0"),
    ],
)
def test_config_errors_say_what_to_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _group_norm_eps(model: torch.nn.Module) -> dict[str, float]:
    return {f"{name}.weight": m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_norm_eps_sets_the_resnet_and_output_norms_like_diffusers(eps):
    """diffusers' `norm_eps` reaches the ResNet blocks' and the output GroupNorm, while the transformers' GroupNorm
    stays 1e-6 (Transformer2DModel): each of our GroupNorms has the eps of the diffusers norm its weight maps from."""
    from diffusers import UNet2DConditionModel

    cfg = UNetConfig(**{**TINY, "channel_mult": (1, 2), "attention_levels": (0,), "norm_eps": eps})
    kwargs = diffusers_unet_kwargs(cfg)
    assert kwargs["norm_eps"] == eps
    with torch.device("meta"):
        theirs, ours = _group_norm_eps(UNet2DConditionModel(**kwargs)), _group_norm_eps(UNet(cfg))
    mapped = state_dict_from_diffusers({k: torch.tensor(v, dtype=torch.float64) for k, v in theirs.items()})
    assert ours == {k: v.item() for k, v in mapped.items()}
    assert {v for k, v in ours.items() if "attentions" in k} == {1e-6}
    assert ours["norm_out.weight"] == ours["down_blocks.0.resnets.0.norm1.weight"] == eps


def test_config_without_norm_eps_builds_the_former_unet():
    """An artifact written before `norm_eps` existed has no such field: it builds with GroupNorm eps 1e-6 everywhere."""
    from ldmkit.nn.backbones import backbone_spec, build_backbone

    spec = backbone_spec(UNet(UNetConfig(**TINY)))
    assert spec["config"].pop("norm_eps") == 1e-6
    old = build_backbone(spec["arch"], spec["config"])
    assert old.config == UNetConfig(**TINY) and set(_group_norm_eps(old).values()) == {1e-6}


def _compile_check(backend: str, device: str, tol: float = 1e-4) -> None:
    cfg = UNetConfig(**{**TINY, "channel_mult": (1,), "attention_levels": (0,), "pooled_dim": 12})
    model = randomized(UNet(cfg)).to(device)
    x, t, context, pooled = (a.to(device) for a in inputs(cfg))
    mask = torch.tensor([[True, True, True, False, False], [True] * 5], device=device)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break fails
    expected = model(x, t.float(), context, pooled, mask)
    out = compiled(x, t.float(), context, pooled, mask)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol / 10)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    expected_grads = torch.autograd.grad(expected.square().mean(), list(model.parameters()))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=10 * tol, atol=tol / 10)


@pytest.mark.slow
def test_torch_compile_captures_one_graph_with_equal_outputs_and_grads():
    # aot_eager traces forward and backward exactly as inductor would, without C++ codegen, which
    # takes ~3 min for this net on a shared 2-core CPU; inductor itself is checked on the GPU below.
    _compile_check("aot_eager", "cpu")


@pytest.mark.slow
@pytest.mark.gpu
def test_torch_compile_inductor_matches_eager_on_gpu():
    _compile_check("inductor", "cuda", tol=1e-2)  # cuDNN convs may use TF32
