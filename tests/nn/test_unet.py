from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from ldmkit.nn.unet import (
    UNET_PRESETS,
    UNet,
    UNetConfig,
    diffusers_unet_kwargs,
    state_dict_from_diffusers,
    timestep_embedding,
    unet_from_preset,
)

# A few-thousand-parameter config that still exercises every block type.
TINY = dict(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
    num_heads=2, context_dim=16, norm_groups=8,
)

EXPECTED_PARAMS = {"tiny": 6_105_348, "small": 41_619_460, "base": 222_809_476, "sd15": 859_520_964}

# runwayml/stable-diffusion-v1-5 unet/config.json (architecture fields).
SD15_DIFFUSERS_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention_levels": ()},  # transformer only in the middle
        {"attention_levels": (1,), "num_heads": None, "head_dim": 16},
        {"transformer_depth": 2, "pooled_dim": 12},
        {"scale_shift_norm": True, "time_embed_dim": 48},
        {"context_dim": None},
        {"channel_mult": (1, 2, 2), "num_res_blocks": 2, "in_channels": 3, "out_channels": 6, "dropout": 0.1},
    ],
    ids=["base", "mid-attn-only", "head_dim", "depth2-pooled", "scale-shift", "unconditional", "3-levels"],
)
def test_output_shape(overrides):
    cfg = UNetConfig(**{**TINY, **overrides})
    model = randomized(UNet(cfg))
    x, t, context, pooled = inputs(cfg, size=(8, 12))
    out = model(x, t, context, pooled)
    assert out.shape == (2, cfg.out_channels, 8, 12)
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero():
    cfg = UNetConfig(**TINY)
    assert not UNet(cfg)(*inputs(cfg)).any()  # zero-initialised conv_out, as in LDM / ADM


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = unet_from_preset(name)
    assert count(model) == EXPECTED_PARAMS[name]


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


def test_context_changes_output_and_mask_hides_tokens():
    cfg = UNetConfig(**TINY)
    model = randomized(UNet(cfg)).eval()
    x, t, context, _ = inputs(cfg)
    keep = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    with torch.no_grad():
        out = model(x, t, context, context_mask=keep)
        assert not torch.allclose(model(x, t, torch.randn_like(context)), model(x, t, context), atol=1e-4)

        changed = context.clone()
        changed[0, 3:] = torch.randn(2, cfg.context_dim)  # masked tokens of sample 0
        torch.testing.assert_close(model(x, t, changed, context_mask=keep), out)

        changed[1, 3:] = torch.randn(2, cfg.context_dim)  # unmasked tokens of sample 1
        assert not torch.allclose(model(x, t, changed, context_mask=keep)[1], out[1], atol=1e-4)


def test_pooled_embedding_changes_output():
    cfg = UNetConfig(**TINY, pooled_dim=12)
    model = randomized(UNet(cfg)).eval()
    x, t, context, pooled = inputs(cfg)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, context, pooled), model(x, t, context, pooled + 1), atol=1e-4)


def test_gradient_checkpointing_gives_identical_outputs_and_grads():
    cfg = UNetConfig(**{**TINY, "transformer_depth": 2, "pooled_dim": 12})
    model = randomized(UNet(cfg))
    x, t, context, pooled = inputs(cfg)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])

    def run(checkpointing: bool):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        out = model(x, t, context, pooled, mask)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)


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


def test_bf16_autocast_forward_backward():
    cfg = UNetConfig(**TINY)
    model = randomized(UNet(cfg))
    x, t, context, _ = inputs(cfg)
    expected = model(x, t, context).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context)
    out.float().square().mean().backward()
    assert out.shape == x.shape
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_few_adamw_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    cfg = UNetConfig(**TINY)
    model = UNet(cfg)
    opt = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.01), lr=1e-3)
    x, t, context, _ = inputs(cfg, batch=4)
    target = torch.randn_like(x)
    losses = []
    for _ in range(8):
        loss = (model(x, t, context) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_optimizer_groups_cover_every_parameter_once():
    model = UNet(UNetConfig(**TINY))
    decay, no_decay = model.optimizer_groups(weight_decay=0.1)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_config_round_trips_through_json_and_mappings():
    cfg = dataclasses.replace(UNET_PRESETS["small"], pooled_dim=64)
    restored = UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert restored == cfg
    # Hydra-style: a mapping with lists, or plain keyword arguments
    as_lists = {**TINY, "channel_mult": [1, 2], "attention_levels": [1, 0]}
    assert UNet(as_lists).config == UNet(**as_lists).config == UNet.from_kwargs(**TINY).config == UNetConfig(**TINY)
    assert unet_from_preset("tiny", context_dim=512).config.context_dim == 512


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: unet_from_preset("huge"), "choose one of"),
        (lambda: unet_from_preset("tiny", channels=3), "unknown UNetConfig fields"),
        (lambda: UNetConfig(**{**TINY, "num_heads": 3}), "not divisible by num_heads=3"),
        (lambda: UNetConfig(**{**TINY, "head_dim": 16}), "exactly one of num_heads"),
        (lambda: UNetConfig(**{**TINY, "attention_levels": (2,)}), "outside 0..1"),
    ],
)
def test_config_errors_say_what_to_fix(build, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        build()


def test_forward_errors_say_what_to_fix():
    cfg = UNetConfig(**TINY, pooled_dim=12)
    model = UNet(cfg)
    x, t, context, pooled = inputs(cfg)
    with pytest.raises(ValueError, match="needs context of shape"):
        model(x, t, None, pooled)
    with pytest.raises(ValueError, match="pooled is missing"):
        model(x, t, context)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(x[..., :7], t, context, pooled)
    with pytest.raises(ValueError, match="context_mask must be a bool"):
        model(x, t, context, pooled, torch.ones(2, 5))


def test_nn_modules_import_no_training_framework():
    code = (
        "import sys, ldmkit.nn.unet, ldmkit.nn.attention;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "unet_train_step.py"
    spec = importlib.util.spec_from_file_location("unet_train_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_parses_its_gpu_mode():
    args = _load_bench().parse_args(["--device", "cuda", "--preset", "sd15", "--latent-size", "64", "--compile"])
    assert (args.device, args.preset, args.compile, args.dtypes) == ("cuda", "sd15", True, ["fp32", "bf16"])


@pytest.mark.slow
def test_benchmark_runs_on_cpu(capsys):
    argv = ["--batch", "2", "--context-len", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]
    _load_bench().main(argv)
    out = capsys.readouterr().out
    assert "parameters: ldmkit 6,105,348  diffusers 6,105,348" in out
    assert "fp32  samples/s" in out and "bf16  samples/s" in out
