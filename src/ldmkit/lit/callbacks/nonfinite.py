"""A guard against non-finite steps: an optimizer step whose gradients hold NaN/Inf is skipped and counted;
too many in a row stop the run with a diagnosis."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def grads_finite(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """One device bool: are all gradients finite? Fused: one `_foreach_norm` per device/dtype, no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)  # a NaN/Inf anywhere in a tensor makes its norm non-finite
    device = norms[0].device
    return torch.isfinite(torch.stack([n.to(device, torch.float32) for n in norms])).all()


def skip_nonfinite_step(optimizer: torch.optim.Optimizer) -> bool:
    """Drop this step's gradients (set to None) when any is non-finite; True when the step must be skipped.

    torch optimizers skip parameters whose `.grad` is None, so a following `optimizer.step()` changes
    neither the weights nor the moments (Adam's step count included). One host sync.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if bool(grads_finite(params)):
        return False
    optimizer.zero_grad(set_to_none=True)
    return True


def precision_advice(precision: str, gradient_clip_val: float | None = None) -> str:
    """The overflow hint of the NaN guard for the run's actual `trainer.precision`."""
    clip = "" if gradient_clip_val else " or clip gradients with trainer.gradient_clip_val=1.0"
    if precision in ("32-true", "32", "64-true", "64"):
        return (f"exploding activations or gradients (not a low-precision overflow: the run already uses "
                f"precision={precision}{'; clip them with trainer.gradient_clip_val=1.0' if clip else ''})")
    if precision in ("16-mixed", "16"):
        fix = "trainer.precision=bf16-mixed (same range as float32, on GPUs that support it) or 32-true"
    elif precision.startswith("bf16") or precision.startswith("16"):
        fix = "trainer.precision=32-true" + (" or bf16-mixed (float32 weights)" if precision.endswith("-true") else "")
    else:
        fix = "trainer.precision=32-true"
    return f"low-precision overflow (precision={precision}: try {fix}{clip})"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite gradients."""


class NonFiniteGuard(Callback):
    """Skip optimizer steps whose gradients contain NaN/Inf; stop after `max_consecutive` in a row.

    Runs in `on_before_optimizer_step`, which Lightning calls for automatic optimisation and for
    every `opt.step()` of a manual-optimisation module (the autoencoder's generator and
    discriminator steps go through it without any code in the module). A NaN/Inf loss makes every
    gradient NaN, so checking gradients also catches non-finite losses. This is the one host sync per
    optimizer step in training (reading back one bool); under DDP gradients are already all-reduced,
    so all ranks take the same decision without a collective (other strategies reduce it).

    The skipped step still advances the global step and the LR schedule (`train/nonfinite_steps`
    logs the running count). Counters are saved in checkpoints.
    """

    def __init__(self, max_consecutive: int = 20, log_every_skip: bool = True) -> None:
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard.max_consecutive must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.log_every_skip = log_every_skip
        self.skipped = 0
        self.consecutive = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = bool(grads_finite(params))
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)  # sharded grads: agree
        if finite:
            self.consecutive = 0
            return
        diagnosis = self._diagnose(pl_module) if self.consecutive + 1 >= self.max_consecutive else ""
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, rank_zero_only=True)
        if self.log_every_skip:
            rank_zero_warn(f"Non-finite gradients at global step {trainer.global_step}: optimizer step skipped ({self.consecutive} in a row, {self.skipped} in total).")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row had NaN/Inf gradients (the last at global step "
                f"{trainer.global_step}; {self.skipped} skipped in total), so training stopped. {diagnosis}"
                "Likely causes: the learning rate is too high (lower model.optimizer.lr or lengthen the warm-up); "
                f"{precision_advice(str(trainer.precision), trainer.gradient_clip_val)}; "
                "or bad data (NaN/Inf in the inputs of the batches at these steps). "
                "Resume from an earlier checkpoint (ckpt_path=.../step_XXXXXXX.ckpt) after the fix; allow more with "
                "callbacks.nonfinite_guard.max_consecutive=N."
            )

    @staticmethod
    def _diagnose(pl_module: LightningModule) -> str:
        for name, param in pl_module.named_parameters():
            if not torch.isfinite(param).all():
                return f"The weights themselves are already non-finite (first: `{name}`), so skipping steps cannot recover. "
        for name, param in pl_module.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                return f"The first parameter with a non-finite gradient is `{name}`. "
        return ""
