"""Stage 3: the text-conditioned latent diffusion model (`model=ldm`).

A thin LightningModule: the backbone (conf/backbone, a `_partial_` that needs only the facts the artifacts
give), the training objective with its noise process (conf/process) and the optimizer come built from
config; the frozen autoencoder and CLIP text encoder (`ldmkit.nn.frozen.FrozenEncoders`) come from the
artifact folders of stages 1 and 2. Validation samples through `ldmkit.generator.TextToImage`, the
generator `eval.py` uses, with the whole sampler config.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.aggregation import MeanMetric

from ldmkit.artifacts import ArtifactError, ldm_artifact, save_artifact
from ldmkit.diffusion.objectives import DenoisingObjective
from ldmkit.diffusion.samplers import check_sampler_supports
from ldmkit.generator import BackboneDenoiser, TextToImage
from ldmkit.lit.ema import EMA
from ldmkit.lit.images import log_image_grid
from ldmkit.lit.optim import WarmupCosine, build_optimizer, clip_gradients, param_groups, uses_grad_scaler, warmup_cosine_schedule
from ldmkit.nn.backbones import BackboneFactMismatch, backbone_spec, check_latent_size
from ldmkit.nn.clip import TextNoise
from ldmkit.nn.frozen import FrozenEncoders, check_text_context, load_frozen_encoders, text_context_dim

FROZEN_PREFIXES = ("autoencoder.", "text_encoder.")
ENCODERS_KEY = "ldmkit_frozen_encoders"  # checkpoint entry: weights hashes of the frozen encoders


def build_backbone_for(backbone: nn.Module | Callable[..., nn.Module], frozen: FrozenEncoders, use_pooled: bool,
                       autoencoder: str, text_encoder: str, text_context: str = "tokens") -> nn.Module:
    """The backbone from its `_partial_` factory and the artifacts' facts (or a built one, checked against them)."""
    context_dim = text_context_dim(text_context, frozen.context_dim, frozen.pooled_dim)
    facts = {"in_channels": frozen.latent_channels, "out_channels": frozen.latent_channels,
             "context_dim": context_dim, "pooled_dim": frozen.pooled_dim if use_pooled else None}
    sources = {"context_dim": f"the text encoder '{text_encoder}'", "pooled_dim": f"the text encoder '{text_encoder}'",
               "in_channels": f"the autoencoder '{autoencoder}'", "out_channels": f"the autoencoder '{autoencoder}'"}
    fix = "Remove the override (it is filled in from the artifacts) or train matching stages."
    if isinstance(backbone, nn.Module):
        for key, needed in facts.items():
            if getattr(backbone, key) != needed:
                raise ArtifactError(f"the backbone has {key}={getattr(backbone, key)} but {sources[key]} gives {needed}. "
                                    "Build it with the artifacts' widths, or train matching stages.")
        return backbone
    try:
        return backbone(facts=facts)
    except BackboneFactMismatch as err:
        raise ArtifactError(f"backbone {err.key}={err.given} but {sources[err.key]} gives {err.needed}. {fix}") from err


def backbone_from_init(folder: str, loss: DenoisingObjective) -> nn.Module:
    """The backbone of an `ldm` artifact (e.g. `python -m ldmkit.cli.convert import`'s DIR/ldm) to fine-tune, after
    checking that the run trains it under the process and prediction it was trained with."""
    from ldmkit.artifacts import load_artifact, read_ldm_artifact
    from ldmkit.nn.backbones import build_backbone

    tensors, config = load_artifact(folder, "ldm")
    spec = read_ldm_artifact(folder, config, tensors)
    if spec.process["prediction"] != loss.prediction:
        raise ArtifactError(f"model.init='{folder}' predicts {spec.process['prediction']}, but this run trains "
                            f"{loss.prediction}: set model.loss.prediction={spec.process['prediction']}.")
    theirs, ours = spec.process_tensors.get("alphas_cumprod"), getattr(loss.process, "alphas_cumprod", None)
    if spec.process["kind"] != loss.process.kind or (theirs is not None and ours is not None and (
            theirs.shape != ours.shape or not torch.allclose(theirs.double(), ours.double(), atol=1e-9))):
        raise ArtifactError(f"model.init='{folder}' was trained under the process {spec.process.get('schedule') or spec.process['kind']}, "
                            "this run under another: pick the matching process= (e.g. process=scaled_linear for Stable Diffusion).")
    backbone = build_backbone(spec.backbone["arch"], spec.backbone["config"])
    backbone.load_state_dict(spec.backbone_state)
    return backbone


class LatentDiffusionModule(LightningModule):
    def __init__(
        self,
        backbone: nn.Module | Callable[..., nn.Module],
        autoencoder: str | None,
        text_encoder: str | None,
        loss: DenoisingObjective,
        optimizer: Callable[..., torch.optim.Optimizer],
        *,
        clip_skip: int = 1,
        text_encoder_arch: str | None = None,
        use_pooled: bool = True,
        text_context: str = "tokens",
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
        split_weight_decay: bool = False,
        init: str | None = None,
        text_noise_prob: float = 0.0,
        text_noise_max_tokens: int = 3,
    ) -> None:
        """`split_weight_decay`: the optimizer's weight decay skips biases, norms and embeddings
        (`lit.optim.param_groups`); the default is one group of all backbone parameters, as before.
        `text_context`: what the backbone cross-attends to, `tokens` (the text encoder's per-token states, as
        Stable Diffusion), `pooled` (its pooled embedding as the one context token) or `tokens+pooled`.
        `text_noise_prob` / `text_noise_max_tokens`: in training, that share of the captions gets 1..max random
        token ids inserted before the frozen text encoder reads them (`ldmkit.nn.clip.TextNoise`), meant to teach the
        backbone to read the content words' states however unfamiliar words around them move them (on `shapes` it
        moved one weak-CLIP LDM by 3-4 points: BENCHMARKS.md, session 11). With a latent cache, its captions are then
        encoded each step."""
        super().__init__()
        # plain values only: checkpoints must load with weights_only=True
        self.save_hyperparameters(ignore=["backbone", "loss", "optimizer"])
        self.text_noise = TextNoise(text_noise_prob, text_noise_max_tokens, field="model.text_noise")
        check_sampler_supports(str((sampler or {}).get("name", "dpmpp_2m")), loss.process)  # before any validation
        check_text_context(text_context)  # its name, before the encoders load (their widths are checked after)
        # fails fast and cheaply on a missing or wrong artifact before loading anything
        self.frozen = load_frozen_encoders(autoencoder, text_encoder, clip_skip=clip_skip, text_encoder_arch=text_encoder_arch)
        self.autoencoder, self.text_encoder = self.frozen.autoencoder, self.frozen.text_encoder
        self.scale_factor, self.shift_factor = self.frozen.scale_factor, self.frozen.shift_factor
        self.latent_channels = self.frozen.latent_channels
        self.downsampling_factor = self.frozen.downsampling_factor
        self.latent = self.frozen.latent_spec(self._resolution())

        if init is not None:  # fine-tune an existing ldm artifact: its backbone replaces the `backbone` config
            backbone = backbone_from_init(init, loss)
        self.backbone = build_backbone_for(backbone, self.frozen, use_pooled, autoencoder, text_encoder, text_context)
        check_latent_size(self.backbone, self.latent.height, self.latent.width)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.ema = EMA(self.backbone, decay=ema_decay, half_life_images=None if ema_decay is not None else ema_half_life_images, warmup_steps=ema_warmup_steps)
        self.objective = loss
        self.process = loss.process
        self.optimizer_factory = optimizer
        self.sampler = dict(sampler or {"name": "dpmpp_2m", "steps": 20, "guidance_scale": 4.0})
        self.val_bucket_loss = nn.ModuleList(MeanMetric() for _ in range(val_timestep_buckets))
        self.val_bucket_x0_mse = nn.ModuleList(MeanMetric() for _ in range(val_timestep_buckets))
        self._forward_net = torch.compile(self.backbone) if compile else self.backbone
        self._denoiser = BackboneDenoiser(self._forward_net, self.backbone.pooled_dim is not None, text_context)
        self._uncond: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch_size = 0

    # names from before the backbone / noise-process contract
    @property
    def unet(self) -> nn.Module:
        return self.backbone

    @property
    def schedule(self):
        return self.process

    @property
    def loss_fn(self) -> DenoisingObjective:
        return self.objective

    # ---- conditioning -------------------------------------------------------------------
    def frozen_context(self) -> contextlib.AbstractContextManager:
        """No grad, and bf16 autocast with `frozen_bf16` (the backbone keeps `trainer.precision`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.hparams.frozen_bf16:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        return stack

    def encode_text(self, captions: Sequence[str], text_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D), (B, P) in float32; `text_noise`: with `text_noise_prob`'s random tokens (training)."""
        encoder = self.text_encoder
        tokens = encoder.tokenizer(list(captions))  # on the CPU, where the noise is drawn: no device sync
        if text_noise:
            tokens = self.text_noise(tokens, encoder.tokenizer, encoder.vocab_size, self.global_rank, self.global_step)
        with self.frozen_context():
            context, pooled = encoder.encode_tokens(tokens)
        return context.float(), pooled.float()

    def empty_prompt_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._uncond is None or self._uncond[0].device != self.device:
            self._uncond = self.encode_text([""])
        return self._uncond

    def conditioning(self, batch: dict[str, Any], drop_prob: float,
                     text_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings, with each caption replaced by the empty prompt with probability `drop_prob`
        (condition dropout, so that classifier-free guidance has an unconditional model to contrast).
        `text_noise`: insert `text_noise_prob`'s random tokens into the captions first (training)."""
        noisy = text_noise and bool(self.text_noise)
        if "context" in batch and not noisy:  # from the latent cache
            context, pooled = batch["context"], batch["pooled"]
        else:  # text noise re-encodes a latent cache's captions (its stored text states are noise-free)
            context, pooled = self.encode_text(batch["caption"], text_noise=noisy)
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
        z = self.frozen.normalize(z)
        return z.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else z

    def net(self, x_t: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The denoiser `model(x_t, t, cond)` the objective trains (the one `TextToImage` samples with)."""
        return self._denoiser(x_t, t, cond)

    # ---- training -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # A latent cache (data=latent_cache) holds another model's encodings if it was built with other
        # frozen encoders; training would silently learn the wrong latents, so its datamodule checks them.
        check = getattr(getattr(self.trainer, "datamodule", None), "check_encoders", None)
        if check is not None:
            check(autoencoder=self.hparams.autoencoder, text_encoder=self.hparams.text_encoder, clip_skip=self.hparams.clip_skip)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.latents(batch)
        cond = self.conditioning(batch, self.hparams.cond_drop_prob, text_noise=True)
        loss = self.objective(self.net, x0, cond).mean()
        self._batch_size = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA right after the weights change, before any callback (e.g. ModelCheckpoint in
        # on_train_batch_end) can save a checkpoint whose EMA would lag the weights by one step
        images_per_step = self._batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        self.ema.update(self.backbone, images_per_step=images_per_step, step=self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = param_groups(self.backbone, self.hparams.split_weight_decay)
        optimizer = build_optimizer(self.optimizer_factory, groups, self.device, uses_grad_scaler(self))
        warmup = self.hparams.lr_warmup_steps
        if self.hparams.lr_decay:
            schedule = warmup_cosine_schedule(optimizer, int(self.trainer.estimated_stepping_batches), warmup)
        else:  # linear warm-up, then constant (the usual choice for diffusion with EMA)
            schedule = LambdaLR(optimizer, WarmupCosine(warmup, total_steps=0, min_lr_ratio=1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # also with fused AdamW

    # ---- validation ---------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss per time bucket on held-out data, with fixed noise so runs are comparable. Also the x0-space
        MSE, which is comparable across parameterisations and noise processes (for sweeps)."""
        generator = torch.Generator(self.device).manual_seed(1000 + batch_idx)
        x0 = self.latents(batch)
        cond = self.conditioning(batch, 0.0)
        t, loss, x0_mse = self.objective.validation_losses(self.net, x0, cond, generator)
        buckets = len(self.val_bucket_loss)
        bucket = self.process.time_bucket(t, buckets)
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
            backbone=self.ema.shadow if use_ema else self.backbone, frozen=self.frozen, process=self.process,
            prediction=self.objective.prediction, resolution=self._resolution(), text_context=self.hparams.text_context,
        )

    def sample_validation_grid(self) -> torch.Tensor:
        """The validation prompts drawn with the whole sampler config (spacing, eta, grid options included),
        exactly as `eval.py` draws them with the same config."""
        prompts = list(self.hparams.val_prompts)
        seeds = [self.hparams.val_seed + i for i in range(len(prompts))]
        return self.text_to_image().generate_with(prompts, seeds, self.sampler)

    def _resolution(self) -> int:
        if self.hparams.resolution:
            return int(self.hparams.resolution)
        return self.frozen.native_resolution

    # ---- checkpoints and export --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen encoders live in their own artifacts; keep checkpoints to what training changes, and
        # record which encoders these weights were trained on
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(FROZEN_PREFIXES)}
        checkpoint[ENCODERS_KEY] = self.frozen.hashes()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if ENCODERS_KEY in checkpoint:
            self.frozen.check_identity(checkpoint[ENCODERS_KEY], "The checkpoint being resumed (ckpt_path)")
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("unet.")]:  # checkpoints from before the backbone registry
            state["backbone." + key[len("unet."):]] = state.pop(key)
        own = self.state_dict()
        state.update({k: v for k, v in own.items() if k.startswith(FROZEN_PREFIXES)})

    def export_artifact(self, folder: Path, datamodule: Any = None) -> Path:
        backbone = self.ema.shadow
        process_config, process_tensors = self.process.to_artifact()
        tensors, config = ldm_artifact(
            backbone_spec(backbone), backbone.state_dict(), process_config, process_tensors, self.objective.prediction,
            autoencoder=self.hparams.autoencoder, text_encoder=self.hparams.text_encoder,
            text_encoder_options={"clip_skip": self.hparams.clip_skip, "model_name": self.hparams.text_encoder_arch,
                                  "context": self.hparams.text_context},
            latent={"channels": self.latent_channels, "downsampling_factor": self.downsampling_factor,
                    "scale_factor": self.scale_factor, "shift_factor": self.shift_factor},
            encoders=self.frozen.hashes(),
            resolution=self._resolution(),
            sampler=self.sampler,
            global_step=int(self.global_step),
            weights="ema",
        )
        return save_artifact(folder, "ldm", tensors, config)
