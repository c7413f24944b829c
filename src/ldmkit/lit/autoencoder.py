"""Stage 1: the KL autoencoder (`model=autoencoder`).

Loss as in LDM's `LPIPSWithDiscriminator` (Rombach et al. 2022, App. G; Esser et al. 2021):
per-sample sum of |x - x̂| (+ perceptual_weight · LPIPS), + kl_weight · KL(q(z|x) || N(0, I)),
+ an adaptively weighted patch-GAN generator loss once `disc_start` autoencoder steps have
passed; the discriminator is trained with its own optimizer from then on (manual optimisation).

Note: with the discriminator on, Lightning's `trainer.global_step` (hence `trainer.max_steps`,
checkpoint intervals) counts both optimizers' steps. `disc_start` and `lr_warmup_steps` count
autoencoder steps (one per batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldmkit.artifacts import save_artifact
from ldmkit.lit.images import log_image_grid
from ldmkit.lit.optim import build_optimizer, clip_gradients, param_groups, uses_grad_scaler, warmup_cosine_schedule
from ldmkit.nn.autoencoder import ARTIFACT_KIND, AutoencoderKL, measure_latent_stats
from ldmkit.nn.discriminator import DISC_LOSSES, adaptive_gan_weight, generator_loss

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# per-pixel reconstruction penalty of the difference x - x̂: L1 as in LDM; squared error maximises
# PSNR directly and learns small high-contrast objects sooner (L1's median ignores them longest)
RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"l1": torch.abs, "mse": torch.square}


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor (step + 1) / warmup_steps up to 1, then constant (1 throughout when warmup_steps <= 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


def update_image_metrics(metrics: Sequence[nn.Module], preds: torch.Tensor, target: torch.Tensor) -> None:
    """Update PSNR / SSIM-style metrics in float32 even inside bf16-mixed steps. Autocast would run
    SSIM's Gaussian-window convolutions in bf16, whose 8-bit mantissa wrecks the variance terms
    (E[x^2] - E[x]^2): SSIM of a 29 dB reconstruction read 0.74 instead of 0.89."""
    with torch.autocast(device_type=preds.device.type, enabled=False):
        for metric in metrics:
            metric.update(preds.float(), target.float())


class AutoencoderModule(LightningModule):
    def __init__(
        self,
        autoencoder: AutoencoderKL,
        optimizer: OptimizerFactory,
        *,
        discriminator: nn.Module | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        lpips: nn.Module | Callable[[], nn.Module] | None = None,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_start: int = 0,
        disc_loss: str = "hinge",
        adaptive_disc_weight: bool = True,
        lr_warmup_steps: int = 0,
        lr_decay: bool = False,
        reconstruction_loss: str = "l1",
        grad_clip_norm: float | None = None,
        sample_posterior: bool = True,
        latent_stats_batches: int | None = 32,
        latent_stats_use: str = "mean",
        num_log_images: int = 8,
        channels_last: bool = False,
        compile: bool = False,
        split_weight_decay: bool = False,
    ) -> None:
        """`optimizer` / `disc_optimizer`: factories taking `params` (Hydra `_partial_: true`); the
        discriminator reuses `optimizer` when `disc_optimizer` is None. `split_weight_decay`: no weight
        decay on biases, norms and embeddings (`lit.optim.param_groups`; default one group, all decay).
        `lpips`: an LPIPS module, or
        a factory called when fitting starts (so configs instantiate without the weight files)."""
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction_loss must be one of {sorted(RECONSTRUCTION_LOSSES)}, got {reconstruction_loss!r}")
        if latent_stats_use not in ("mean", "sample"):
            raise ValueError(f"latent_stats_use must be 'mean' or 'sample', got {latent_stats_use!r}")
        # plain values only: checkpoints must load with weights_only=True
        self.save_hyperparameters(ignore=["autoencoder", "optimizer", "discriminator", "disc_optimizer", "lpips"])
        self.automatic_optimization = False
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        # LPIPS is frozen and kept out of the module tree: not in checkpoints, not seen by DDP
        self._frozen: dict[str, nn.Module] = {}
        self._lpips_factory = None
        if isinstance(lpips, nn.Module):
            self._frozen["lpips"] = lpips
        elif lpips is not None:
            self._lpips_factory = lpips
        self.disc_loss_fn = DISC_LOSSES[disc_loss]
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.test_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.test_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        # autoencoder optimizer steps taken; saved in checkpoints (global_step counts both optimizers)
        self.ae_step = 0
        if channels_last:
            self.autoencoder.to(memory_format=torch.channels_last)
        self._compiled = False

    # ---- set-up ------------------------------------------------------------------------
    def configure_model(self) -> None:
        self.perceptual_net()  # build LPIPS now: a missing weight file fails before the first step
        if self.hparams.compile and not self._compiled:
            self.autoencoder.compile()
            self._compiled = True

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if (
            stage == "fit"
            and self.discriminator is not None
            and isinstance(strategy, DDPStrategy)
            and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        ):
            raise ValueError(
                "The autoencoder's GAN loss steps the autoencoder and the discriminator with separate backward "
                "passes, each leaving the other's parameters without gradients, which DDP rejects unless "
                "find_unused_parameters is on: add trainer.strategy.find_unused_parameters=true "
                "(or turn the GAN off with model.discriminator=null)."
            )

    def perceptual_net(self) -> nn.Module | None:
        if "lpips" not in self._frozen and self._lpips_factory is not None:
            self._frozen["lpips"] = self._lpips_factory()
        net = self._frozen.get("lpips")
        if net is not None and next(net.buffers()).device != self.device:
            net.to(self.device)
        return net

    @property
    def uses_gan(self) -> bool:
        return self.discriminator is not None

    def _schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = self.hparams.lr_warmup_steps
        if not self.hparams.lr_decay:
            return linear_warmup(optimizer, warmup)
        # cosine to 0 over the run; the schedulers step once per batch, while trainer.max_steps counts
        # both optimizers' steps once the discriminator is on, so with the GAN the decay ends later
        return warmup_cosine_schedule(optimizer, int(self.trainer.estimated_stepping_batches), warmup)

    def _optimizer(self, factory: Any, module: torch.nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(module, self.hparams.split_weight_decay)
        return build_optimizer(factory, groups, self.device, uses_grad_scaler(self))

    def configure_optimizers(self) -> Any:
        opt_g = self._optimizer(self.optimizer_factory, self.autoencoder)
        sched_g = self._schedule(opt_g)
        if not self.uses_gan:
            return {"optimizer": opt_g, "lr_scheduler": {"scheduler": sched_g, "interval": "step"}}
        opt_d = self._optimizer(self.disc_optimizer_factory, self.discriminator)
        sched_d = self._schedule(opt_d)
        return [opt_g, opt_d], [{"scheduler": sched_g, "interval": "step"}, {"scheduler": sched_d, "interval": "step"}]

    # ---- losses ------------------------------------------------------------------------
    def reconstruction_nll(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample sum over pixels of |x - x̂| (or its square) + w·LPIPS, per-pixel L1 mean), as in LDM."""
        recon = recon.float()
        diff = x.float() - recon  # (B, C, H, W)
        l1 = diff.abs().mean()
        rec = RECONSTRUCTION_LOSSES[self.hparams.reconstruction_loss](diff)
        lpips = self.perceptual_net()
        if lpips is not None and self.hparams.perceptual_weight > 0:
            rec = rec + self.hparams.perceptual_weight * lpips(x, recon).float()[:, None, None, None]
        return rec.sum(dim=(1, 2, 3)), l1

    def _prepare(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ---- training ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self._prepare(batch)  # (B, 3, H, W) in [-1, 1]
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers()
        opt_g, opt_d = optimizers if self.uses_gan else (optimizers, None)
        sched_g, sched_d = schedulers if self.uses_gan else (schedulers, None)
        # python ints only: deciding whether the GAN is on must not sync with the device
        gan_on = self.uses_gan and self.ae_step >= self.hparams.disc_start
        logs: dict[str, torch.Tensor] = {}

        # -- autoencoder ("generator") step
        if self.uses_gan:
            self.toggle_optimizer(opt_g)
        recon, posterior = self.autoencoder(x, sample_posterior=self.hparams.sample_posterior)
        nll, l1 = self.reconstruction_nll(x, recon)
        nll_loss = nll.mean()
        kl_loss = posterior.kl().mean()
        loss = nll_loss + self.hparams.kl_weight * kl_loss
        if gan_on:
            g_loss = generator_loss(self.discriminator(recon)).mean()
            if self.hparams.adaptive_disc_weight:
                d_weight = adaptive_gan_weight(nll_loss, g_loss, self.autoencoder.last_layer) * self.hparams.disc_weight
            else:
                d_weight = torch.tensor(self.hparams.disc_weight, device=self.device)
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": d_weight})
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_g)
        opt_g.step()
        sched_g.step()
        if self.uses_gan:
            self.untoggle_optimizer(opt_g)
        self.ae_step += 1
        logs.update({"train/loss": loss.detach(), "train/nll": nll_loss.detach(), "train/kl": kl_loss.detach()})

        # -- discriminator step (not before disc_start: its loss and optimizer stay unused)
        if gan_on:
            self.toggle_optimizer(opt_d)
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(recon.detach())
            d_loss = self.disc_loss_fn(logits_real, logits_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.step()
            sched_d.step()
            self.untoggle_optimizer(opt_d)
            logs.update({
                "train/disc_loss": d_loss.detach(),
                "train/logits_real": logits_real.detach().mean(),
                "train/logits_fake": logits_fake.detach().mean(),
            })
        self.log("train/rec_loss", l1.detach(), prog_bar=True, batch_size=x.shape[0])  # per-pixel L1
        self.log_dict(logs, batch_size=x.shape[0])

    def _clip(self, optimizer: Any) -> None:
        clip_gradients(self, optimizer, self.hparams.grad_clip_norm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["autoencoder_steps"] = self.ae_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ae_step = int(checkpoint.get("autoencoder_steps", 0))

    # ---- evaluation --------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], batch_idx: int, prefix: str, psnr: nn.Module, ssim: nn.Module) -> None:
        x = self._prepare(batch)
        recon, posterior = self.autoencoder(x, sample_posterior=False)  # posterior mean: deterministic
        recon = recon.float()
        n = x.shape[0]
        self.log(f"{prefix}/rec_loss", (x.float() - recon).abs().mean(), sync_dist=True, batch_size=n)
        self.log(f"{prefix}/kl", posterior.kl().mean(), sync_dist=True, batch_size=n)
        lpips = self.perceptual_net()
        if lpips is not None:
            self.log(f"{prefix}/lpips", lpips(x, recon).mean(), sync_dist=True, batch_size=n)
        # PSNR / SSIM on images as they would be saved: clamped and mapped to [0, 1]
        x01, recon01 = (x.float() + 1) / 2, (recon.clamp(-1, 1) + 1) / 2
        update_image_metrics((psnr, ssim), recon01, x01)
        self.log(f"{prefix}/psnr", psnr, prog_bar=prefix == "val", batch_size=n)
        self.log(f"{prefix}/ssim", ssim, batch_size=n)
        k = min(self.hparams.num_log_images, n)
        if batch_idx == 0 and k > 0 and not self.trainer.sanity_checking:
            # top row: inputs, bottom row: reconstructions
            images = torch.cat([x[:k].float(), recon[:k].clamp(-1, 1)])
            log_image_grid(self.loggers, f"{prefix}/reconstructions", images, step=self.global_step, nrow=k)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val", self.val_psnr, self.val_ssim)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test", self.test_psnr, self.test_ssim)

    # ---- artifact ----------------------------------------------------------------------
    def export_artifact(self, folder: str | Path, datamodule: Any = None) -> Path:
        """Write the autoencoder artifact: weights, architecture, and the latent scale/shift
        measured on up to `latent_stats_batches` training batches (docs/CONVENTIONS.md)."""
        batches = _training_batches(datamodule if datamodule is not None else self._attached_datamodule())
        use = self.hparams.latent_stats_use
        generator = torch.Generator(self.device).manual_seed(0) if use == "sample" else None
        stats = measure_latent_stats(self.autoencoder, batches, self.hparams.latent_stats_batches, use=use, generator=generator)
        cfg = self.autoencoder.config
        config = {
            "architecture": cfg.to_dict(),
            "latent_channels": cfg.latent_channels,
            "downsampling_factor": cfg.downsampling_factor,
            "resolution": cfg.resolution,
            # normalise latents as (z - shift_factor) * scale_factor; decode z / scale_factor + shift_factor
            "scale_factor": 1.0 / stats["std"],
            "shift_factor": stats["mean"],
            "latent_stats": stats,
            "autoencoder_steps": self.ae_step,
            "metrics": self._final_metrics(),
        }
        return save_artifact(folder, ARTIFACT_KIND, self.autoencoder.state_dict(), config)

    def _attached_datamodule(self) -> Any:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None:
            raise ValueError(
                "export_artifact measures the latent scale on training data: pass datamodule=... "
                "(a LightningDataModule or any iterable of batches), or call it after trainer.fit(model, datamodule)."
            )
        return datamodule

    def _final_metrics(self) -> dict[str, float]:
        trainer = self._trainer
        if trainer is None:
            return {}
        return {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "test/")) and isinstance(v, torch.Tensor) and v.numel() == 1 and math.isfinite(float(v))
        }


def _training_batches(source: Any) -> Iterable[Any]:
    if hasattr(source, "train_dataloader"):
        return source.train_dataloader()
    if isinstance(source, Iterable):
        return source
    raise TypeError(f"export_artifact needs a datamodule or an iterable of batches, got {type(source).__name__}")
