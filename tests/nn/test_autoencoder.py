from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldmkit.artifacts import ArtifactError, save_artifact
from ldmkit.nn.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    load_autoencoder,
    measure_latent_stats,
    round_trip,
)
from ldmkit.nn.blocks import Downsample, ResnetBlock, SpatialSelfAttention, Upsample
from ldmkit.nn.discriminator import NLayerDiscriminator, adaptive_gan_weight, generator_loss, hinge_d_loss
from ldmkit.nn.lpips import LPIPS, LPIPSWeightsNotFound

TINY_F4 = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=4)
TINY_F8 = dict(base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, num_groups=4)


def tiny(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(**{**TINY_F4, **overrides}))


def artifact_config(model: AutoencoderKL, **extra) -> dict:
    cfg = model.config
    return {"architecture": cfg.to_dict(), "latent_channels": cfg.latent_channels, "downsampling_factor": cfg.downsampling_factor,
            "resolution": cfg.resolution, "scale_factor": 1.5, "shift_factor": 0.25, **extra}


# ---- shapes and config --------------------------------------------------------------------

@pytest.mark.parametrize("arch, factor", [(TINY_F4, 4), (TINY_F8, 8)])
def test_encode_decode_shapes(arch, factor):
    model = AutoencoderKL(AutoencoderConfig(**arch, latent_channels=4))
    assert model.downsampling_factor == factor
    x = torch.randn(2, 3, 32, 32)
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 32 // factor, 32 // factor)
    assert model.decode(posterior.sample()).shape == (2, 3, 32, 32)
    recon, post = model(x, sample_posterior=False)
    assert recon.shape == x.shape and torch.equal(post.mode(), post.mean)
    assert model.config.latent_shape(64) == (4, 64 // factor, 64 // factor)


def test_latent_channels_and_non_square_inputs():
    model = tiny(latent_channels=8)
    posterior = model.encode(torch.randn(1, 3, 16, 24))
    assert posterior.mean.shape == (1, 8, 4, 6)
    assert model.decode(posterior.mode()).shape == (1, 3, 16, 24)


def test_config_round_trips_through_json():
    cfg = AutoencoderConfig(**TINY_F8, latent_channels=16, resolution=64, mid_attention=False)
    restored = AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg and restored.channel_mult == (1, 1, 2, 2)
    assert restored.downsampling_factor == 8


def test_config_accepts_lists_and_rejects_unknown_fields():
    assert AutoencoderConfig(channel_mult=[1, 2]).channel_mult == (1, 2)
    with pytest.raises(ValueError, match="unknown AutoencoderConfig fields \\['z_channels'\\]"):
        AutoencoderConfig.from_dict({"z_channels": 4})


def test_resolution_not_divisible_gives_actionable_error():
    msg = ("resolution 30 is not divisible by the autoencoder's downsampling factor 4: "
           "set data.resolution to a multiple of 4, e.g. 32")
    with pytest.raises(ValueError, match=msg):
        AutoencoderConfig(**TINY_F4, resolution=30)
    with pytest.raises(ValueError, match="downsampling factor 8: set data.resolution to a multiple of 8"):
        AutoencoderConfig(**TINY_F8, resolution=36)
    with pytest.raises(ValueError, match="resolution 30 is not divisible"):
        tiny().encode(torch.randn(1, 3, 30, 32))
    AutoencoderConfig(**TINY_F4, resolution=32)  # a multiple is fine


# ---- posterior ---------------------------------------------------------------------------

def test_kl_of_standard_normal_posterior_is_zero():
    posterior = DiagonalGaussianDistribution(torch.zeros(3, 8, 4, 4))  # mean 0, logvar 0
    assert torch.equal(posterior.kl(), torch.zeros(3))


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)
    other_mean, other_logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    other = DiagonalGaussianDistribution(torch.cat([other_mean, other_logvar], dim=1))
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(other_mean, (0.5 * other_logvar).exp())).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(other), expected)


def test_posterior_sampling_uses_generator_and_clamps_logvar():
    params = torch.cat([torch.randn(2, 4, 2, 2), torch.full((2, 4, 2, 2), -100.0)], dim=1)
    posterior = DiagonalGaussianDistribution(params)
    assert posterior.logvar.min() == -30.0
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 2, 2))
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    c = posterior.sample(torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    draws = torch.stack([posterior.sample(torch.Generator().manual_seed(s)) for s in range(2000)])
    torch.testing.assert_close(draws.mean(0), posterior.mean, atol=0.15 * posterior.std.max().item(), rtol=0)
    torch.testing.assert_close(draws.std(0), posterior.std, rtol=0.1, atol=0)


def test_logvar_init_shifts_only_the_initial_posterior_logvar():
    plain, shifted = tiny(), tiny(logvar_init=-6.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = plain.encode(x), shifted.encode(x)
    torch.testing.assert_close(b.mean, a.mean)
    torch.testing.assert_close(b.logvar, a.logvar - 6.0)
    assert AutoencoderConfig.from_dict(shifted.config.to_dict()).logvar_init == -6.0


# ---- shared blocks -----------------------------------------------------------------------

def test_blocks_shapes_and_embedding():
    x = torch.randn(2, 16, 8, 8)
    assert Downsample(16, 32)(x).shape == (2, 32, 4, 4)
    assert Upsample(16)(x).shape == (2, 16, 16, 16)
    assert SpatialSelfAttention(16, num_heads=2, num_groups=4)(x).shape == x.shape
    block = ResnetBlock(16, 24, emb_channels=10, num_groups=4, scale_shift_norm=True)
    emb = torch.randn(2, 10)
    out = block(x, emb)
    assert out.shape == (2, 24, 8, 8)
    assert not torch.allclose(out, block(x, torch.randn(2, 10)))  # the embedding matters
    with pytest.raises(ValueError, match="needs an embedding"):
        block(x)
    zero = ResnetBlock(16, emb_channels=10, num_groups=4, zero_init=True)
    torch.testing.assert_close(zero(x, emb), x)  # zero-initialised residual branch: identity


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = SpatialSelfAttention(8, num_heads=1, num_groups=4)
    x = torch.randn(1, 8, 3, 3)
    h = attn.norm(x)
    q, k, v = attn.qkv(h).flatten(2).chunk(3, dim=1)  # (1, 8, 9) each
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (1, 9, 9)
    expected = x + attn.proj_out((v @ weights.transpose(1, 2)).view(1, 8, 3, 3))
    torch.testing.assert_close(attn(x), expected)


# ---- adversarial parts -------------------------------------------------------------------

def test_patch_discriminator_and_losses():
    disc = NLayerDiscriminator(base_channels=8, n_layers=2)
    logits = disc(torch.randn(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # a map of patch logits
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert torch.equal(hinge_d_loss(real, fake), torch.zeros(2))  # both beyond the margin
    torch.testing.assert_close(hinge_d_loss(-real, -fake), torch.full((2,), 3.0))
    torch.testing.assert_close(generator_loss(fake), torch.full((2,), 2.0))


def test_adaptive_weight_is_finite_and_matches_gradient_ratio():
    model, disc = tiny(), NLayerDiscriminator(base_channels=8, n_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _ = model(x)
    nll = (x - recon).abs().sum()
    g_loss = generator_loss(disc(recon)).mean()
    weight = adaptive_gan_weight(nll, g_loss, model.last_layer)
    assert weight.ndim == 0 and torch.isfinite(weight) and weight > 0 and not weight.requires_grad
    g_nll = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0]
    g_g = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)[0]
    torch.testing.assert_close(weight, (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4))
    (nll + weight * g_loss).backward()  # the graph was retained for the real backward


# ---- LPIPS -------------------------------------------------------------------------------

def test_lpips_without_weights_names_the_file(tmp_path):
    with pytest.raises(LPIPSWeightsNotFound, match="vgg16-397923af.pth") as err:
        LPIPS(vgg_weights=tmp_path / "vgg16-397923af.pth")
    message = str(err.value)
    assert str(tmp_path / "vgg16-397923af.pth") in message and "download.pytorch.org" in message
    assert "model.lpips.vgg_weights" in message


def test_lpips_with_local_weight_files(tmp_path):
    from ldmkit.nn.lpips import _TAP_CHANNELS, _vgg16_features

    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file also holds the classifier
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(_TAP_CHANNELS)}, tmp_path / "vgg.pth")
    lpips = LPIPS(tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth").train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(LPIPSWeightsNotFound, match="vgg.pth"):
        LPIPS(tmp_path / "vgg16-397923af.pth", tmp_path / "missing" / "vgg.pth")


# ---- artifacts ---------------------------------------------------------------------------

def test_load_autoencoder_round_trip(tmp_path):
    model = tiny(seed=3)
    folder = save_artifact(tmp_path / "ae", "autoencoder", model.state_dict(), artifact_config(model))
    loaded, scale, shift, config = load_autoencoder(folder)
    assert (scale, shift) == (1.5, 0.25) and config["latent_channels"] == 4
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config == model.config
    z = torch.randn(2, 4, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), model.decode(z))


def test_load_autoencoder_rejects_wrong_kind(tmp_path):
    model = tiny()
    folder = save_artifact(tmp_path / "clip", "clip", model.state_dict(), artifact_config(model))
    with pytest.raises(ArtifactError, match="holds a 'clip' artifact, but a 'autoencoder' artifact is needed"):
        load_autoencoder(folder)


def test_load_autoencoder_rejects_weights_that_do_not_match_the_config(tmp_path):
    model = tiny()  # 4 latent channels
    config = artifact_config(model)
    config["architecture"] = {**config["architecture"], "latent_channels": 8}
    folder = save_artifact(tmp_path / "ae", "autoencoder", model.state_dict(), config)
    with pytest.raises(ArtifactError, match="does not match the architecture.*shape mismatches: .*conv_out.weight"):
        load_autoencoder(folder)
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("quant_conv")}
    folder = save_artifact(tmp_path / "ae2", "autoencoder", tensors, artifact_config(model))
    with pytest.raises(ArtifactError, match="2 missing keys: quant_conv.bias, quant_conv.weight"):
        load_autoencoder(folder)


def test_load_autoencoder_checks_expected_latent_channels_and_fields(tmp_path):
    model = tiny()
    folder = save_artifact(tmp_path / "ae", "autoencoder", model.state_dict(), artifact_config(model))
    with pytest.raises(ArtifactError, match="has 4 latent channels, but 16 are expected"):
        load_autoencoder(folder, latent_channels=16)
    config = artifact_config(model)
    del config["scale_factor"]
    folder = save_artifact(tmp_path / "ae2", "autoencoder", model.state_dict(), config)
    with pytest.raises(ArtifactError, match="no 'scale_factor'"):
        load_autoencoder(folder)


def test_measure_latent_stats_matches_direct_computation():
    model = tiny().eval()
    batches = [{"image": torch.rand(3, 3, 32, 32) * 2 - 1} for _ in range(4)]
    stats = measure_latent_stats(model, batches, num_batches=3)
    assert stats["num_batches"] == 3 and stats["num_images"] == 9
    with torch.no_grad():
        z = torch.cat([model.encode(b["image"]).mean for b in batches[:3]])
    assert stats["mean"] == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-6)
    assert stats["std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-4)
    torch.testing.assert_close(torch.tensor(stats["channel_mean"], dtype=torch.float64), z.mean(dim=(0, 2, 3)).double(), rtol=1e-5, atol=1e-6)
    assert len(measure_latent_stats(model, batches, num_batches=None, use="sample")["channel_std"]) == 4


# ---- layering ----------------------------------------------------------------------------

def test_nn_modules_stay_pure_torch():
    code = (
        "import sys, ldmkit.nn.autoencoder, ldmkit.nn.blocks, ldmkit.nn.discriminator, ldmkit.nn.lpips;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_utilities', 'hydra', 'omegaconf', 'wandb', 'torchmetrics'));"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class HalvingAutoencoder(torch.nn.Module):
    """encode halves the image, decode quadruples it: round trips are 2x, clamped to [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the device round_trip reads

    def encode(self, x):
        return _Posterior(x / 2)

    def decode(self, z):
        return 4 * z


def test_round_trip_decodes_the_posterior_mode_in_batches_and_clamp():
    images = torch.linspace(-1, 1, 7 * 3 * 2 * 2).reshape(7, 3, 2, 2)
    out = round_trip(HalvingAutoencoder(), images, batch_size=3)
    torch.testing.assert_close(out, (2 * images).clamp(-1, 1))
