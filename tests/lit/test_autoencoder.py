from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ldmkit.config import compose
from ldmkit.data.collate import collate_samples
from ldmkit.lit.autoencoder import AutoencoderModule
from ldmkit.lit.images import log_image_grid
from ldmkit.nn.autoencoder import AutoencoderConfig, AutoencoderKL, load_autoencoder, measure_latent_stats
from ldmkit.nn.discriminator import NLayerDiscriminator
from ldmkit.nn.lpips import LPIPS, LPIPSWeightsNotFound
from tests.conftest import CONF_DIR

TINY = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=4, resolution=16)


class SmoothImages(Dataset):
    """Low-frequency random images in [-1, 1] (learnable in a few steps, unlike white noise)."""

    def __init__(self, n: int = 16, resolution: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        self.images = F.interpolate(coarse, size=resolution, mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": f"image {i}", "attributes": {}}


def loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(SmoothImages(n, seed=seed), batch_size=batch_size, collate_fn=collate_samples)


class TinyDataModule(L.LightningDataModule):
    def __init__(self, n: int = 16, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(self.n, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return loader(8, self.batch_size, seed=1)


def module(gan: bool = False, seed: int = 0, **kwargs) -> AutoencoderModule:
    torch.manual_seed(seed)
    if gan:
        kwargs.setdefault("discriminator", NLayerDiscriminator(base_channels=8, n_layers=2))
    return AutoencoderModule(AutoencoderKL(AutoencoderConfig(**TINY)), functools.partial(torch.optim.Adam, lr=3e-3), **kwargs)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def compose_model():
    def _compose(name: str, resolution: int = 32):
        return compose([f"+data.resolution={resolution}"], f"model/{name}", config_dir=CONF_DIR).model

    yield _compose


# ---- configs -----------------------------------------------------------------------------

def test_quickstart_config_instantiates(compose_model):
    model = instantiate(compose_model("autoencoder"))
    assert isinstance(model, AutoencoderModule) and not model.automatic_optimization
    cfg = model.autoencoder.config
    assert cfg.downsampling_factor == 4 and cfg.latent_shape() == (4, 8, 8) and cfg.resolution == 32
    assert model.discriminator is None and model.perceptual_net() is None
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert type(optimizer.param_groups[0]["betas"]) in (tuple, list)  # plain: checkpoints load weights_only


def test_f8_config_instantiates_without_lpips_files(compose_model):
    model = instantiate(compose_model("autoencoder_f8", resolution=256))
    cfg = model.autoencoder.config
    assert cfg.downsampling_factor == 8 and cfg.latent_shape() == (4, 32, 32)
    assert [cfg.base_channels * m for m in cfg.channel_mult] == [128, 256, 512, 512]
    assert isinstance(model.discriminator, NLayerDiscriminator) and model.hparams.disc_start > 0
    assert model._lpips_factory is not None and "lpips" not in model._frozen  # deferred to fit start


@pytest.mark.parametrize("name, factor", [("autoencoder", 4), ("autoencoder_f8", 8)])
def test_config_rejects_resolution_not_divisible(compose_model, name, factor):
    with pytest.raises(InstantiationException, match=f"resolution 30 is not divisible by the autoencoder's downsampling factor {factor}: set data.resolution to a multiple of {factor}"):
        instantiate(compose_model(name, resolution=30))


# ---- training ----------------------------------------------------------------------------

def test_training_step_without_gan_uses_one_optimizer():
    model = module()
    before = [p.detach().clone() for p in model.autoencoder.parameters()]
    t = trainer(max_steps=3)
    t.fit(model, train_dataloaders=loader())
    assert not isinstance(model.optimizers(), list)
    assert model.ae_step == 3 and t.global_step == 3
    assert all(not torch.equal(a, b) for a, b in zip(before, model.autoencoder.parameters()) if a.numel() > 1)
    assert {"train/loss", "train/rec_loss", "train/kl", "train/nll"} <= set(t.callback_metrics)
    assert "train/disc_loss" not in t.callback_metrics


class RecordDiscriminator(L.Callback):
    def __init__(self) -> None:
        self.weights, self.opt_state_sizes, self.logged = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.discriminator.main[0].weight.detach().clone())
        self.opt_state_sizes.append(len(pl_module.optimizers()[1].optimizer.state))
        self.logged.append("train/disc_loss" in trainer.callback_metrics)


def test_gan_training_honours_disc_start():
    model = module(gan=True, disc_start=2)
    initial = model.discriminator.main[0].weight.detach().clone()
    record = RecordDiscriminator()
    t = trainer(max_epochs=1, limit_train_batches=4, callbacks=[record])
    t.fit(model, train_dataloaders=loader())
    assert len(model.optimizers()) == 2
    assert model.ae_step == 4
    # batches 1-2: discriminator untouched, its optimizer never stepped, nothing logged
    assert torch.equal(record.weights[0], initial) and torch.equal(record.weights[1], initial)
    assert record.opt_state_sizes[:2] == [0, 0] and record.logged[:2] == [False, False]
    # batches 3-4: it trains
    assert not torch.equal(record.weights[2], initial) and not torch.equal(record.weights[3], record.weights[2])
    assert record.opt_state_sizes[2] > 0 and record.logged[2:] == [True, True]
    assert t.global_step == 2 + 2 * 2  # Lightning counts both optimizers' steps in manual optimisation
    weight = t.callback_metrics["train/d_weight"]
    assert torch.isfinite(weight) and weight > 0
    assert all(p.requires_grad for p in model.parameters())  # untoggled after each step


def test_gan_training_in_bf16_mixed():
    model = module(gan=True, disc_start=1)
    t = trainer(max_steps=3, precision="bf16-mixed")
    t.fit(model, train_dataloaders=loader())
    assert model.ae_step == 2
    for key in ("train/loss", "train/d_weight", "train/disc_loss"):
        assert torch.isfinite(t.callback_metrics[key]), key
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_gan_without_adaptive_weight_uses_fixed_weight():
    model = module(gan=True, disc_start=0, adaptive_disc_weight=False, disc_weight=0.25)
    t = trainer(max_steps=2)
    t.fit(model, train_dataloaders=loader())
    assert float(t.callback_metrics["train/d_weight"]) == 0.25
    assert torch.isfinite(t.callback_metrics["train/disc_loss"])


def test_overfits_one_tiny_batch():
    model = module(lr_warmup_steps=0)
    batch = loader(4, batch_size=4)
    t = trainer(max_steps=60)
    with torch.no_grad():
        start = (model.autoencoder(next(iter(batch))["image"], sample_posterior=False)[0] - next(iter(batch))["image"]).abs().mean()
    t.fit(model, train_dataloaders=batch)
    x = next(iter(batch))["image"]
    with torch.no_grad():
        end = (model.autoencoder.eval()(x, sample_posterior=False)[0] - x).abs().mean()
    assert end < 0.35 * start, (float(start), float(end))


def test_lr_warmup_ramps_learning_rate():
    model = module(lr_warmup_steps=4)
    t = trainer(max_steps=2)
    t.fit(model, train_dataloaders=loader())
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(3e-3 * 3 / 4)


def test_lr_decay_is_cosine_over_the_run():
    model = module(lr_warmup_steps=2, lr_decay=True)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.optimizers().param_groups[0]["lr"])

    trainer(max_steps=6, callbacks=[Record()]).fit(model, train_dataloaders=loader(24))
    # warmup over 2 steps, then cosine from 1 to 0 over the remaining 4: factor (1 + cos(pi k / 4)) / 2
    expected = [3e-3 * f for f in (0.5, 1.0, *((1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)))]
    assert seen == pytest.approx(expected), seen


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_reconstruction_loss_options(loss):
    model = module(reconstruction_loss=loss)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = torch.zeros_like(x)
    nll, l1 = model.reconstruction_nll(x, recon)
    expected = x.abs() if loss == "l1" else x.square()
    torch.testing.assert_close(nll, expected.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(l1, x.abs().mean())


def test_unknown_reconstruction_loss_is_rejected():
    with pytest.raises(ValueError, match="reconstruction_loss must be one of"):
        module(reconstruction_loss="huber")


def test_gan_under_ddp_needs_find_unused_parameters():
    model = module(gan=True)
    model.trainer = trainer(strategy=DDPStrategy(find_unused_parameters=False))
    with pytest.raises(ValueError, match="trainer.strategy.find_unused_parameters=true"):
        model.setup("fit")
    model.trainer = trainer(strategy=DDPStrategy(find_unused_parameters=True))
    model.setup("fit")
    no_gan = module()
    no_gan.trainer = trainer(strategy=DDPStrategy(find_unused_parameters=False))
    no_gan.setup("fit")


def test_lpips_requested_without_weights_fails_at_fit_start(tmp_path):
    missing = tmp_path / "models" / "vgg16-397923af.pth"
    model = module(lpips=functools.partial(LPIPS, vgg_weights=missing))  # constructing is fine
    with pytest.raises(LPIPSWeightsNotFound, match=f"'vgg16-397923af.pth', not found at '{missing}'"):
        trainer(max_steps=1).fit(model, train_dataloaders=loader())
    assert model.ae_step == 0


# ---- validation and images ---------------------------------------------------------------

def test_validation_logs_metrics_and_reconstruction_grid(tmp_path):
    model = module(num_log_images=3)
    logger = CSVLogger(tmp_path, name="csv", version="")
    t = trainer(logger=logger, limit_val_batches=None)
    metrics = t.validate(model, dataloaders=loader(8, batch_size=4), verbose=False)[0]
    assert {"val/psnr", "val/ssim", "val/rec_loss", "val/kl"} <= set(metrics)
    # PSNR: mean over images of 10 log10(1 / MSE) with images mapped from [-1, 1] to [0, 1]
    x = torch.cat([b["image"] for b in loader(8, batch_size=4)])
    with torch.no_grad():
        recon = model.autoencoder(x, sample_posterior=False)[0].clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)
    assert metrics["val/psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-4)
    assert metrics["val/rec_loss"] == pytest.approx((model.autoencoder(x, sample_posterior=False)[0] - x).abs().mean().item(), rel=1e-4)
    assert -1 <= metrics["val/ssim"] <= 1
    png = Path(logger.log_dir) / "images" / "val_reconstructions_step0000000.png"
    assert png.is_file()
    assert Image.open(png).size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # 3 inputs over 3 reconstructions, 2px padding


def test_log_image_grid_writes_png_captions_and_tensorboard(tmp_path):
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).view(4, 3, 8, 8)
    csv = CSVLogger(tmp_path, name="csv", version="")
    tb = TensorBoardLogger(tmp_path / "tb", name="", version="")
    written = log_image_grid([csv, tb], "samples/grid", images, step=7, captions=["a", "b", "c", "d"], nrow=2)
    png, txt = written
    assert png.name == "samples_grid_step0000007.png" and txt.read_text() == "0: a\n1: b\n2: c\n3: d\n"
    grid = torch.tensor(list(Image.open(png).getdata())).view(2 * 8 + 6, 2 * 8 + 6, 3)
    assert grid[0, 0].tolist() == [255, 255, 255]  # white padding
    assert grid[2, 2, 0].item() == 0 and grid[-3, -3, 2].item() == 255  # value range [-1, 1] → [0, 255]
    tb.experiment.flush()
    assert any(p.name.startswith("events.out.tfevents") for p in Path(tb.log_dir).iterdir())
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        log_image_grid([csv], "x", images, step=0, captions=["a", "b", "c"])


# ---- artifact ----------------------------------------------------------------------------

def test_export_artifact_round_trip(tmp_path):
    model = module(latent_stats_batches=3)
    datamodule = TinyDataModule(n=20, batch_size=4)
    t = trainer(max_steps=2)
    t.fit(model, datamodule=datamodule)
    folder = model.export_artifact(tmp_path / "artifact", datamodule=datamodule)
    loaded, scale, shift, config = load_autoencoder(folder)
    assert config["kind"] == "autoencoder" and config["latent_channels"] == 4 and config["downsampling_factor"] == 4
    assert config["resolution"] == 16 and config["autoencoder_steps"] == 2
    assert config["latent_stats"]["num_batches"] == 3 and config["latent_stats"]["num_images"] == 12
    expected = measure_latent_stats(model.autoencoder, datamodule.train_dataloader(), num_batches=3)
    assert scale == pytest.approx(1 / expected["std"]) and shift == pytest.approx(expected["mean"])
    assert math.isfinite(scale) and scale > 0
    z = torch.randn(2, 4, 4, 4)
    model.autoencoder.eval()
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), model.autoencoder.decode(z))
    # normalised latents of the training data have ~zero mean and unit std
    x = torch.cat([b["image"] for b in list(datamodule.train_dataloader())[:3]])
    with torch.no_grad():
        z = (loaded.encode(x).mean - shift) * scale
    assert abs(z.mean().item()) < 1e-4 and z.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)


def test_export_artifact_uses_trainer_datamodule_and_checkpoint_loads_weights_only(tmp_path):
    model = module(gan=True, disc_start=0)
    t = trainer(max_steps=2, default_root_dir=tmp_path, enable_checkpointing=True)
    t.fit(model, datamodule=TinyDataModule())
    folder = model.export_artifact(tmp_path / "artifact")  # falls back to trainer.datamodule
    assert load_autoencoder(folder)[3]["latent_stats"]["num_batches"] == 4
    ckpt = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["autoencoder_steps"] == 1  # 2 global steps = 1 autoencoder + 1 discriminator step
    assert not any(k.startswith("_frozen") for k in checkpoint["state_dict"])
    restored = module(gan=True)
    restored.on_load_checkpoint(checkpoint)
    assert restored.ae_step == 1


def test_export_without_data_explains_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="pass datamodule="):
        module().export_artifact(tmp_path / "artifact")


def test_image_metrics_are_float32_inside_bf16_autocast():
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    from ldmkit.lit.autoencoder import update_image_metrics

    from ldmkit.data.shapes import ShapesDataset

    torch.manual_seed(0)
    # flat backgrounds: SSIM's variance terms are small, which bf16 cannot resolve
    target = (torch.stack([r["image"] for r in ShapesDataset("val", size=16, resolution=32, seed=0).__getitems__(range(16))]) + 1) / 2
    preds = (target + 0.03 * torch.randn_like(target)).clamp(0, 1)  # about 30 dB
    reference = StructuralSimilarityIndexMeasure(data_range=1.0)(preds, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = StructuralSimilarityIndexMeasure(data_range=1.0)
        naive.update(preds, target)
        psnr, ssim = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)), StructuralSimilarityIndexMeasure(data_range=1.0)
        update_image_metrics((psnr, ssim), preds, target)
    assert abs(naive.compute() - reference) > 0.01  # what the helper protects against: bf16 SSIM is off
    assert torch.allclose(ssim.compute(), reference, atol=1e-6)
    assert torch.allclose(psnr.compute(), PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))(preds, target), atol=1e-5)
