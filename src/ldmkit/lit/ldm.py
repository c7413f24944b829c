"""Stage 3: the text-conditioned latent diffusion model (`model=ldm`).

A thin LightningModule: the UNet, schedule and loss come built from config; the frozen
autoencoder and CLIP text encoder come from the artifact folders of stages 1 and 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.aggregation import MeanMetric

from ldmkit.artifacts import PRODUCERS, ArtifactError, read_artifact_config, save_artifact
from ldmkit.diffusion.losses import DenoisingLoss
from ldmkit.diffusion.parameterization import target as prediction_target
from ldmkit.diffusion.parameterization import to_x0
from ldmkit.diffusion.schedules import Schedule, q_sample
from ldmkit.lit.ema import EMA
from ldmkit.lit.images import log_image_grid
from ldmkit.lit.optim import WarmupCosine, warmup_cosine_schedule
from ldmkit.txt2img import TextToImage, ldm_artifact_config

FROZEN_PREFIXES = ("autoencoder.", "text_encoder.")


def _check_conditioning(unet_kwargs: dict[str, Any], key: str, needed: int, source: str, fix: str) -> None:
    given = unet_kwargs.get(key)
    if given is not None and given != needed:
        raise ArtifactError(f"model.unet.{key}={given} but {source} gives {needed}. {fix}")


class LatentDiffusionModule(LightningModule):
    def __init__(
        self,
        unet: Callable[..., nn.Module],
        autoencoder: str | None,
        text_encoder: str | None,
        schedule: Schedule,
        loss: DenoisingLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        *,
        clip_skip: int = 1,
        text_encoder_arch: str | None = None,
        use_pooled: bool = True,
        lr_warmup_steps: int = 0,
        lr_decay: bool = False,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = None,
        ema_half_life_images: float | None = 5000.0,
        ema_warmup_steps: int = 0,
        sampler: dict[str, Any] | None = None,
        val_prompts: Sequence[str] = ("a red circle", "a blue square", "a green triangle", "a yellow star"),
        val_seed: int = 0,
        val_timestep_buckets: int = 10,
        resolution: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        frozen_bf16: bool = False,
    ) -> None:
        super().__init__()
        # plain values only: checkpoints must load with weights_only=True
        self.save_hyperparameters(ignore=["unet", "schedule", "loss", "optimizer"])
        from ldmkit.nn.autoencoder import load_autoencoder
        from ldmkit.nn.clip import load_text_encoder

        # Fail fast and cheaply on a missing or wrong artifact before loading anything.
        if not autoencoder:
            raise ArtifactError(
                "model=ldm needs a trained autoencoder: set model.autoencoder=PATH to the `artifact/` folder written by "
                f"`{PRODUCERS['autoencoder']}`."
            )
        if not text_encoder:
            raise ArtifactError(
                "model=ldm needs a text encoder: set model.text_encoder=PATH to the `artifact/` folder written by "
                f"`{PRODUCERS['clip']}`, or to a local open_clip checkpoint file (with model.text_encoder_arch=NAME)."
            )
        read_artifact_config(autoencoder, "autoencoder")
        if Path(text_encoder).is_dir():
            read_artifact_config(text_encoder, "clip")
        elif not Path(text_encoder).is_file():
            raise ArtifactError(
                f"model.text_encoder='{text_encoder}' does not exist. Point it at the artifact folder written by "
                f"`{PRODUCERS['clip']}` (its run folder's `artifact/`) or at a local open_clip checkpoint file "
                "(then also set model.text_encoder_arch, e.g. ViT-B-32)."
            )
        self.autoencoder, self.scale_factor, self.shift_factor, _ = load_autoencoder(autoencoder)
        self.text_encoder = load_text_encoder(text_encoder, clip_skip=clip_skip, model_name=text_encoder_arch)
        self.autoencoder.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        self.latent_channels = int(self.autoencoder.config.latent_channels)
        self.downsampling_factor = int(self.autoencoder.config.downsampling_factor)

        unet_kwargs = dict(getattr(unet, "keywords", {}))
        fix = "Remove the override (it is filled in from the artifacts) or train matching stages."
        _check_conditioning(unet_kwargs, "context_dim", self.text_encoder.context_dim, f"the text encoder '{text_encoder}'", fix)
        _check_conditioning(unet_kwargs, "in_channels", self.latent_channels, f"the autoencoder '{autoencoder}'", fix)
        built = {"context_dim": self.text_encoder.context_dim, "in_channels": self.latent_channels, "out_channels": self.latent_channels}
        if use_pooled:
            built["pooled_dim"] = self.text_encoder.pooled_dim
        self.unet = unet(**{**built, **unet_kwargs})
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.ema = EMA(self.unet, decay=ema_decay, half_life_images=None if ema_decay is not None else ema_half_life_images, warmup_steps=ema_warmup_steps)
        self.schedule = schedule
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.sampler = dict(sampler or {"name": "dpmpp_2m", "steps": 20, "guidance_scale": 4.0})
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_timestep_buckets))
        self.val_bucket_x0_mse = nn.ModuleList(MeanMetric() for _ in range(val_timestep_buckets))
        self._forward_net = torch.compile(self.unet) if compile else self.unet
        self._uncond: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch_size = 0

    # ---- conditioning -------------------------------------------------------------------
    def frozen_context(self) -> contextlib.AbstractContextManager:
        """No grad, and bf16 autocast with `frozen_bf16` (the UNet keeps `trainer.precision`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.hparams.frozen_bf16:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        return stack

    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.frozen_context():
            context, pooled = self.text_encoder(list(captions))  # (B, L, D), (B, P)
        return context.float(), pooled.float()

    def empty_prompt_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._uncond is None or self._uncond[0].device != self.device:
            self._uncond = self.encode_text([""])
        return self._uncond

    def conditioning(self, batch: dict[str, Any], drop_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings, with each caption replaced by the empty prompt with probability `drop_prob`
        (condition dropout, so that classifier-free guidance has an unconditional model to contrast)."""
        if "context" in batch:  # from the latent cache
            context, pooled = batch["context"], batch["pooled"]
        else:
            context, pooled = self.encode_text(batch["caption"])
        if drop_prob > 0:
            drop = torch.rand(context.shape[0], device=context.device) < drop_prob  # no host sync
            empty_context, empty_pooled = self.empty_prompt_embedding()
            context = torch.where(drop[:, None, None], empty_context.to(context.dtype), context)
            pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
        return context, pooled

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Normalised latents (z - shift) * scale, (B, C, H/f, W/f)."""
        if "latent_mean" in batch:  # from the latent cache: posterior mean and std
            z = batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"])
        else:
            with self.frozen_context():
                z = self.autoencoder.encode(batch["image"]).sample().float()
        z = (z - self.shift_factor) * self.scale_factor
        return z.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else z

    def net(self, x_t: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self._forward_net(x_t, t, context=cond[0], pooled=cond[1] if self.hparams.use_pooled else None)

    # ---- training -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # A latent cache (data=latent_cache) holds another model's encodings if it was built with other
        # frozen encoders; training would silently learn the wrong latents, so its datamodule checks them.
        check = getattr(getattr(self.trainer, "datamodule", None), "check_encoders", None)
        if check is not None:
            check(autoencoder=self.hparams.autoencoder, text_encoder=self.hparams.text_encoder, clip_skip=self.hparams.clip_skip)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.latents(batch)
        cond = self.conditioning(batch, self.hparams.cond_drop_prob)
        per_sample, _ = self.loss_fn(self.net, x0, self.schedule, cond=cond)
        loss = per_sample.mean()
        self._batch_size = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA right after the weights change, before any callback (e.g. ModelCheckpoint in
        # on_train_batch_end) can save a checkpoint whose EMA would lag the weights by one step
        images_per_step = self._batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        self.ema.update(self.unet, images_per_step=images_per_step, step=self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.unet.parameters())
        warmup = self.hparams.lr_warmup_steps
        if self.hparams.lr_decay:
            schedule = warmup_cosine_schedule(optimizer, int(self.trainer.estimated_stepping_batches), warmup)
        else:  # linear warm-up, then constant (the usual choice for diffusion with EMA)
            schedule = LambdaLR(optimizer, WarmupCosine(warmup, total_steps=0, min_lr_ratio=1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- validation ---------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss per timestep bucket on held-out data, with fixed noise so runs are comparable.
        Also the x0-space MSE, which is comparable across eps/v/x0 parameterisations (for sweeps)."""
        generator = torch.Generator(self.device).manual_seed(1000 + batch_idx)
        x0 = self.latents(batch)
        cond = self.conditioning(batch, 0.0)
        n, buckets = x0.shape[0], len(self.val_bucket_loss)
        T = self.schedule.num_timesteps
        t = torch.randint(0, T, (n,), generator=generator, device=self.device)
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        x_t = q_sample(self.schedule, x0, t, noise)
        with torch.no_grad():
            out = self.net(x_t, t, cond)
        alpha_bar = self.schedule.alphas_cumprod.to(self.device, torch.float32)[t].view(-1, 1, 1, 1)
        target = prediction_target(self.loss_fn.prediction, x0, noise, alpha_bar)
        loss = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        x0_mse = (to_x0(out.float(), x_t.float(), alpha_bar, self.loss_fn.prediction) - x0.float()).pow(2).flatten(1).mean(1)
        bucket = (t * buckets) // T
        for i in range(buckets):
            weight = (bucket == i).float()
            self.val_bucket_loss[i].update(loss, weight)
            self.val_bucket_x0_mse[i].update(x0_mse, weight)

    def on_validation_epoch_end(self) -> None:
        bucket_losses = [m.compute() for m in self.val_bucket_loss]
        bucket_x0 = [m.compute() for m in self.val_bucket_x0_mse]
        for i, (loss, x0_mse) in enumerate(zip(bucket_losses, bucket_x0)):
            self.log(f"val/loss_t{i}", loss, sync_dist=False)
        self.log("val/loss", torch.stack([l.nan_to_num() for l in bucket_losses]).mean())
        self.log("val/x0_mse", torch.stack([l.nan_to_num() for l in bucket_x0]).mean())
        for metric in (*self.val_bucket_loss, *self.val_bucket_x0_mse):
            metric.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and self.hparams.val_prompts:
            images = self.sample_validation_grid()
            log_image_grid(self.loggers, "val/samples", images, step=self.global_step, captions=list(self.hparams.val_prompts))

    def text_to_image(self, use_ema: bool = True) -> TextToImage:
        return TextToImage(
            unet=self.ema.shadow if use_ema else self.unet, autoencoder=self.autoencoder, text_encoder=self.text_encoder,
            schedule=self.schedule, prediction=self.loss_fn.prediction, scale_factor=self.scale_factor,
            shift_factor=self.shift_factor, latent_channels=self.latent_channels, downsampling_factor=self.downsampling_factor,
            resolution=self._resolution(),
        )

    def sample_validation_grid(self) -> torch.Tensor:
        prompts = list(self.hparams.val_prompts)
        seeds = [self.hparams.val_seed + i for i in range(len(prompts))]
        s = self.sampler
        return self.text_to_image().generate(
            prompts, seeds, sampler=s["name"], steps=int(s["steps"]), guidance_scale=float(s["guidance_scale"]),
            guidance_rescale=float(s.get("guidance_rescale", 0.0)),
        )

    def _resolution(self) -> int:
        if self.hparams.resolution:
            return int(self.hparams.resolution)
        return int(self.autoencoder.config.resolution or 8 * self.downsampling_factor)

    # ---- checkpoints and export --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen encoders live in their own artifacts; keep checkpoints to what training changes
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN_PREFIXES)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(FROZEN_PREFIXES)})

    def export_artifact(self, folder: Path, datamodule: Any = None) -> Path:
        unet = self.ema.shadow
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        tensors["schedule.alphas_cumprod"] = self.schedule.alphas_cumprod.detach().to(torch.float64)
        config = ldm_artifact_config(
            unet_config=dataclasses.asdict(unet.config),
            schedule=self.schedule,
            prediction=self.loss_fn.prediction,
            autoencoder=self.hparams.autoencoder,
            text_encoder=self.hparams.text_encoder,
            text_encoder_options={"clip_skip": self.hparams.clip_skip, "model_name": self.hparams.text_encoder_arch},
            latent={"channels": self.latent_channels, "downsampling_factor": self.downsampling_factor,
                    "scale_factor": self.scale_factor, "shift_factor": self.shift_factor},
            resolution=self._resolution(),
            sampler=self.sampler,
            global_step=int(self.global_step),
            weights="ema",
        )
        return save_artifact(folder, "ldm", tensors, config)
