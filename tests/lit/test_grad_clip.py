"""Gradient clipping with a fused optimizer (found by the GPU check: `train.py model=clip trainer=gpu` died at
its first step, because Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside
its step, also under bf16 where nothing is scaled). Reproduced on the CPU: fused AdamW runs there too."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from ldmkit.lit.optim import build_optimizer, clip_gradients, uses_grad_scaler

from .test_clip import quiet_trainer, tiny_module, tiny_shapes


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records the global gradient norm its update sees (after Lightning's closure: backward + clipping)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norms: list[float] = []

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item())
        self.max_abs = max(g.abs().max().item() for g in grads)
        super().step()
        return loss


class Regression(LightningModule):
    def __init__(self, ours: bool, algorithm: str = "norm"):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.ours, self.algorithm = ours, algorithm

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y) * 1e3  # gradients far above the clip value

    def configure_optimizers(self):
        self.recorder = build_optimizer(partial(RecordingAdamW, lr=1e-3, fused=True), self.parameters(), self.device)
        return self.recorder

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.ours:
            clip_gradients(self, optimizer, gradient_clip_val, self.algorithm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def fit(module: LightningModule, **trainer_kwargs) -> None:
    data = DataLoader(TensorDataset(torch.randn(16, 8), torch.randn(16, 1) * 10), batch_size=8)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, data)


def test_lightning_alone_refuses_to_clip_for_a_fused_optimizer_under_bf16():
    """The failure the helper exists for (if Lightning ever allows it, this test says the helper can go)."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(Regression(ours=False), precision="bf16-mixed", gradient_clip_val=1e-3)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_clip_gradients_clips_the_norm_with_a_fused_optimizer(precision):
    module = Regression(ours=True)
    fit(module, precision=precision, gradient_clip_val=1e-3)
    assert module.recorder.defaults["fused"] is True
    assert len(module.recorder.norms) == 2
    assert max(module.recorder.norms) <= 1e-3 * (1 + 1e-3)


def test_clip_gradients_by_value_with_a_fused_optimizer():
    module = Regression(ours=True, algorithm="value")
    fit(module, precision="bf16-mixed", gradient_clip_val=1e-4, gradient_clip_algorithm="value")
    assert module.recorder.max_abs <= 1e-4


def test_unclipped_gradients_are_large():
    """The control for the two tests above: without clipping the same run's norm is far above 1e-3."""
    module = Regression(ours=True)
    fit(module, precision="bf16-mixed")
    assert min(module.recorder.norms) > 1.0


def test_clip_module_trains_in_bf16_with_fused_adamw():
    """The GPU check's failing run, on the CPU: the CLIP stage (gradient_clip_val 1.0) with fused AdamW, bf16-mixed."""
    module = tiny_module()
    module.optimizer_factory = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, fused=True)
    trainer = quiet_trainer(max_steps=2, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, tiny_shapes())
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True


def test_no_automatic_fused_optimizer_under_a_grad_scaler():
    scaled = SimpleNamespace(trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object())))
    plain = SimpleNamespace(trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None)))
    assert uses_grad_scaler(scaled) and not uses_grad_scaler(plain)
    assert not uses_grad_scaler(torch.nn.Linear(1, 1))  # no trainer at all
    assert not uses_grad_scaler(Regression(ours=True))  # a LightningModule not attached to a Trainer
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert build_optimizer(partial(torch.optim.AdamW, lr=1e-3), params, "cuda").defaults["fused"] is True
    assert not build_optimizer(partial(torch.optim.AdamW, lr=1e-3), params, "cuda", grad_scaler=True).defaults["fused"]


def test_bad_clip_algorithm_is_named():
    with pytest.raises(ValueError, match="'norm' or 'value'"):
        clip_gradients(Regression(ours=True), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, "max")
