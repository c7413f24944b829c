"""Contrastive CLIP training on open_clip models (`python train.py model=clip`).

The LightningModule wires an open_clip network (built by `ldmkit.nn.clip.build_clip`), a
stateless loss (`ClipLoss` / `SigLipLoss`) and the optimizer factories. Features are gathered
across DDP ranks here, explicitly and with gradients (open_clip `loss.py` pattern, DESIGN anchor 10).

Validation collects normalised embeddings of the whole held-out split, gathers them across ranks
in sampler order (dropping DistributedSampler padding) and reports image→text / text→image
recall@{1,5,10} and, on `shapes` / `digits`, zero-shot classification accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from ldmkit.data.digits import DigitsDataModule
from ldmkit.data.shapes import ShapesDataModule
from ldmkit.lit.batches import move_batch_tensors
from ldmkit.lit.optim import build_optimizer, build_scheduler, clip_gradients, param_groups, uses_grad_scaler
from ldmkit.nn.clip import (
    ClipLoss,
    TextNoise,
    ZeroShotTask,
    artifact_config,
    build_tokenizer,
    caption_ids,
    encode_images,
    encode_texts,
    retrieval_recall,
    zero_shot_accuracy,
)

RECALL_KS = (1, 5, 10)


# ------------------------------------------------------------------------ zero-shot tasks per dataset


# Each datamodule that has a zero-shot task exposes it as `zero_shot_task(template=...)`; these names
# let `zero_shot=shapes` pick one whatever the data.
shapes_zero_shot_task = ShapesDataModule.zero_shot_task
digits_zero_shot_task = DigitsDataModule.zero_shot_task
ZERO_SHOT_TASKS: dict[str, Callable[..., ZeroShotTask]] = {"shapes": shapes_zero_shot_task, "digits": digits_zero_shot_task}


def zero_shot_task_for(datamodule: Any, choice: str | None = "auto", template: str | None = None) -> ZeroShotTask | None:
    """`auto`: the datamodule's own task (its `zero_shot_task` hook), else None."""
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        hook = getattr(datamodule, "zero_shot_task", None)
        if hook is None:
            return None
        return hook(template) if template else hook()
    if choice not in ZERO_SHOT_TASKS:
        raise ValueError(f"zero_shot={choice!r} is not one of {['auto', None, *ZERO_SHOT_TASKS]}.")
    return ZERO_SHOT_TASKS[choice](template) if template else ZERO_SHOT_TASKS[choice]()


# ------------------------------------------------------------------------ DDP helpers


def merge_rank_shards(gathered: Tensor, counts: Tensor, total: int | None = None) -> Tensor:
    """Undo DistributedSampler's round-robin split: (W, M, ...) per-rank rows -> (N, ...) in dataset order.

    Rank r holds dataset rows r, r+W, r+2W, ... (`shuffle=False`); `counts[r]` of its M rows are
    real. Rows past `total` are the sampler's padding (repeats of the first rows) and are dropped,
    so every sample counts once, as in a single process.
    """
    world, rows = gathered.shape[:2]
    interleaved = gathered.transpose(0, 1).reshape(world * rows, *gathered.shape[2:])  # row m*W + r
    valid = (torch.arange(rows, device=counts.device)[:, None] < counts[None, :]).reshape(-1)
    merged = interleaved[valid.to(interleaved.device)]
    return merged[:total] if total is not None and merged.shape[0] > total else merged


def _dataset_length(dataloaders: Any) -> int | None:
    loader = dataloaders[0] if isinstance(dataloaders, (list, tuple)) else dataloaders
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


# ------------------------------------------------------------------------ LightningModule


class ClipModule(LightningModule):
    """Contrastive image-text training of an open_clip model.

    Args:
        net: an open_clip ``CLIP`` from ``ldmkit.nn.clip.build_clip``.
        optimizer: optimizer factory (Hydra `_partial_`), called with weight-decay param groups.
        scheduler: LR scheduler factory called with ``(optimizer, total_steps=...)`` (warmup + cosine).
        loss: ``ClipLoss(local_loss=...)`` (default) or ``SigLipLoss()``.
        tokenizer: defaults to open_clip's tokenizer for ``net``.
        gradient_clip_val: clip the global gradient norm (unless the Trainer sets its own).
        grad_checkpointing: recompute transformer blocks in backward to save memory.
        max_logit_scale: clamp of the learnable inverse temperature (CLIP: 100).
        zero_shot: ``auto`` (from the datamodule), ``shapes``, ``digits`` or None.
        zero_shot_template: prompt template override, e.g. ``"a photo of a {colour} {shape}"``.
        text_noise_prob: share of training captions that get random token ids inserted
            (``ldmkit.nn.clip.insert_random_tokens``; 0 = off). Training only; drawn from a generator seeded by
            (initial seed, rank, step), so a run and its resumption draw the same noise.
        text_noise_max_tokens: at most this many insertions per chosen caption (1..max, uniform).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: nn.Module | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        gradient_clip_val: float | None = 1.0,
        grad_checkpointing: bool = False,
        max_logit_scale: float = 100.0,
        zero_shot: str | None = "auto",
        zero_shot_template: str | None = None,
        text_noise_prob: float = 0.0,
        text_noise_max_tokens: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "loss", "tokenizer"], logger=False)
        self.net = net
        self.loss = loss if loss is not None else ClipLoss()
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(net)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.gradient_clip_val = gradient_clip_val
        self.max_logit_scale = float(max_logit_scale)
        self.zero_shot = zero_shot
        self.zero_shot_template = zero_shot_template
        self.text_noise = TextNoise(text_noise_prob, text_noise_max_tokens, field="model.text_noise")
        if grad_checkpointing:
            net.set_grad_checkpointing(True)
        self._val_outputs: dict[str, list[Tensor]] = {}
        self._zero_shot_task: ZeroShotTask | None = None

    # -------------------------------------------------------------- features

    def encode(self, batch: dict[str, Any], text_noise: bool = False) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text features (B, E) in float32 (stable logits under bf16 autocast).
        Uses the batch's ``tokens`` (B, L) when the data pipeline made them (open_clip tokenizes in its
        DataLoader workers), else tokenizes the captions here (~7 ms of host time per 128 captions).
        `text_noise`: insert random tokens into `text_noise_prob` of the captions (training)."""
        tokens = batch.get("tokens")
        if tokens is None:
            tokens = self.tokenizer(list(batch["caption"]))
        if text_noise and self.text_noise:
            tokens = self.noisy_tokens(tokens)
        tokens = tokens.to(self.device)  # (B, L)
        image_features = encode_images(self.net, batch["image"], normalize=True)
        text_features = self.net.encode_text(tokens, normalize=True)
        return image_features.float(), text_features.float()

    def noisy_tokens(self, tokens: Tensor) -> Tensor:
        vocab = int(getattr(self.net, "vocab_size", 0) or self.net.token_embedding.num_embeddings)
        return self.text_noise(tokens, self.tokenizer, vocab, self.global_rank, self.global_step)

    def gather_features(self, features: Tensor) -> Tensor:
        """(B, E) on each rank -> (W*B, E), differentiable (gradients flow back to their rank).
        Needs the same B on every rank, as DistributedSampler (padding) + drop_last give."""
        gathered = self.all_gather(features, sync_grads=True)
        return gathered.flatten(0, 1) if gathered.dim() == features.dim() + 1 else gathered

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        logit_scale = self.net.logit_scale.exp()
        logit_bias = getattr(self.net, "logit_bias", None)
        per_sample = self.loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            all_image_features=self.gather_features(image_features),
            all_text_features=self.gather_features(text_features),
            rank=self.global_rank,
        )
        return per_sample.mean()

    # -------------------------------------------------------------- training

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Only the tensors travel: Lightning's default walks every caption and per-sample attribute
        # dict too (~2.7 ms of host time per batch of 128 on `shapes`, see BENCHMARKS.md).
        return move_batch_tensors(batch, device) if isinstance(batch, dict) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image_features, text_features = self.encode(batch, text_noise=True)
        loss = self.contrastive_loss(image_features, text_features)
        batch_size = image_features.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", self.net.logit_scale.detach().exp(), batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # CLIP clamps the learned temperature so logits never exceed max_logit_scale (100); right after
        # the step, before any callback (ModelCheckpoint runs in on_train_batch_end) can save it unclamped
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        value = gradient_clip_val if gradient_clip_val is not None else self.gradient_clip_val
        clip_gradients(self, optimizer, value, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimizer_factory, param_groups(self.net), self.device, uses_grad_scaler(self))
        scheduler = build_scheduler(self.scheduler_factory, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer

    # -------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {"image": [], "text": [], "caption_id": [], "target": []}
        self._zero_shot_task = zero_shot_task_for(self.trainer.datamodule, self.zero_shot, self.zero_shot_template)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_features, text_features = self.encode(batch)
        loss = self.loss(image_features, text_features, self.net.logit_scale.exp(), getattr(self.net, "logit_bias", None)).mean()
        self.log("val/loss", loss, sync_dist=True, batch_size=image_features.shape[0])
        self._val_outputs["image"].append(image_features)
        self._val_outputs["text"].append(text_features)
        self._val_outputs["caption_id"].append(caption_ids(batch["caption"]).to(self.device))
        if self._zero_shot_task is not None:
            self._val_outputs["target"].append(self._zero_shot_task.targets(batch.get("attributes") or [{}] * len(batch["caption"])).to(self.device))

    def gather_eval(self, local: Tensor) -> Tensor:
        """All ranks' validation rows in dataset order (no gradients), padding samples dropped."""
        if self.trainer.world_size == 1:
            return local
        counts = self.all_gather(torch.tensor(local.shape[0], device=self.device)).reshape(-1)  # (W,)
        rows = int(counts.max())
        if local.shape[0] < rows:
            local = torch.cat([local, local.new_zeros(rows - local.shape[0], *local.shape[1:])])
        gathered = self.all_gather(local)  # (W, M, ...)
        return merge_rank_shards(gathered, counts, _dataset_length(self.trainer.val_dataloaders))

    def on_validation_epoch_end(self) -> None:
        outputs = {k: torch.cat(v) for k, v in self._val_outputs.items() if v}
        self._val_outputs = {}
        if "image" not in outputs:
            return
        metrics = self.compute_val_metrics({k: self.gather_eval(v) for k, v in outputs.items()})
        # identical on every rank (computed from gathered embeddings): no reduction needed
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)

    @torch.no_grad()
    def compute_val_metrics(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        metrics = retrieval_recall(outputs["image"], outputs["text"], outputs["caption_id"], ks=RECALL_KS)
        task = self._zero_shot_task
        if task is not None and "target" in outputs:
            prompts = encode_texts(self.net, self.tokenizer, task.prompts(), normalize=True).float()
            accuracy = zero_shot_accuracy(outputs["image"], prompts, task.combinations(), outputs["target"], task.keys)
            metrics.update({f"zeroshot_{k}": v for k, v in accuracy.items()})
        return metrics

    # -------------------------------------------------------------- artifact

    def export_artifact(self, folder: str | Path, datamodule: Any = None) -> Path:
        """Write `weights.safetensors` (open_clip state dict) + `config.json` for `load_clip` /
        `load_text_encoder`; records the final validation metrics and the training data."""
        from ldmkit.artifacts import save_artifact

        config = artifact_config(self.net)
        trainer = self._trainer
        config["trained"] = {
            "global_step": int(self.global_step),
            "data": getattr(datamodule, "name", type(datamodule).__name__ if datamodule is not None else None),
            "resolution": getattr(datamodule, "resolution", None),
            "loss": type(self.loss).__name__,
        }
        if trainer is not None:
            config["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        tensors = {k: v for k, v in self.net.state_dict().items()}
        return save_artifact(folder, "clip", tensors, config)
