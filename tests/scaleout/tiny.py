"""A tiny LightningModule + datamodule that exercise everything the scale-out infrastructure touches
(global RNG in the training step, AdamW, an LR schedule, an EMA, validation metrics, manual optimisation),
run through the real `train.py` via `hydra.searchpath=[file://tests/scaleout/conf]`, `model=tiny data=tiny`."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ldmkit.lit.ema import EMA


class TinyDataset(Dataset):
    """`length` fixed (x, y) pairs with y = A x + noise; a sample is a pure function of its index."""

    def __init__(self, length: int, dim: int, split_seed: int) -> None:
        g = torch.Generator().manual_seed(split_seed)
        self.x = torch.randn(length, dim, generator=g)
        a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1234))
        self.y = self.x @ a * 0.5 + 0.1 * torch.randn(length, dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class TinyDataModule(LightningDataModule):
    def __init__(self, batch_size: int = 4, train_batches: int = 5, dim: int = 8, num_workers: int = 0, resolution: int = 8) -> None:
        super().__init__()
        self.batch_size, self.train_batches, self.dim, self.num_workers = batch_size, train_batches, dim, num_workers

    def train_dataloader(self) -> DataLoader:
        # world size unknown here: every rank gets `train_batches` batches per epoch
        world = self.trainer.world_size if self.trainer else 1
        return DataLoader(TinyDataset(self.batch_size * self.train_batches * world, self.dim, 0), batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TinyDataset(self.batch_size * 2, self.dim, 1), batch_size=self.batch_size, num_workers=self.num_workers)


class TinyModule(LightningModule):
    def __init__(
        self,
        dim: int = 8,
        lr: float = 1e-2,
        warmup_steps: int = 10,
        ema_decay: float = 0.9,
        noise: float = 0.3,
        step_sleep: float = 0.0,
        nan_steps: list[int] | None = None,
        prediction: str = "eps",
        weighting: str = "uniform",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))
        self.ema = EMA(self.net, decay=ema_decay)

    def training_step(self, batch, batch_idx):
        if self.hparams.step_sleep:
            time.sleep(self.hparams.step_sleep)
        x = batch["x"] + self.hparams.noise * torch.randn_like(batch["x"])  # global RNG: resume must restore it
        loss = nn.functional.mse_loss(self.net(x).float(), batch["y"])
        if self.global_step in set(self.hparams.nan_steps or ()):
            loss = loss * float("nan")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        # EMA after the optimizer step, inside the step: callbacks' on_train_batch_end (ModelCheckpoint,
        # PreemptionCheckpoint) run *before* the module's, so an update there would miss the checkpoint
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net, images_per_step=self.trainer.datamodule.batch_size, step=self.global_step)

    def validation_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.ema.shadow(batch["x"]).float(), batch["y"])
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/x0_mse", loss * 2, sync_dist=True)
        # validation draws from the global RNG too: it must not shift the training stream
        self.log("val/noise", torch.randn(()), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        warm = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * math.exp(-s / 200))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export_artifact(self, folder: Path, datamodule=None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, folder / "weights.pt")
        return folder


class TinyManualModule(TinyModule):
    """Manual optimisation with two optimisers, like the autoencoder's generator/discriminator steps."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.critic = nn.Linear(self.hparams.dim, 1)

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x = batch["x"] + self.hparams.noise * torch.randn_like(batch["x"])
        loss = nn.functional.mse_loss(self.net(x), batch["y"])
        if self.global_step // 2 in set(self.hparams.nan_steps or ()):  # global_step counts both optimisers
            loss = loss * float("nan")
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        self.ema.update(self.net, images_per_step=len(x), step=self.global_step)
        d_loss = self.critic(self.net(x).detach()).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.log("train/loss", loss)

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr), torch.optim.AdamW(self.critic.parameters(), lr=self.hparams.lr)]
