"""Optimizer helpers shared by the LightningModules: weight-decay groups, warmup + cosine LR, fused AdamW
(and gradient clipping that works with it).

Config pattern (the LightningModule receives `_partial_` factories and calls these):

    optimizer: {_target_: torch.optim.AdamW, _partial_: true, lr: 5e-4, weight_decay: 0.1}
    scheduler: {_target_: ldmkit.lit.optim.warmup_cosine_schedule, _partial_: true, warmup_steps: 100}

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer, param_groups(self.net), self.device, uses_grad_scaler(self))
        return {"optimizer": optimizer, "lr_scheduler": build_scheduler(self.scheduler, optimizer, self.trainer)}
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def is_no_decay(name: str, param: nn.Parameter, owner: nn.Module, skip: Iterable[str] = ()) -> bool:
    """True for gains, biases, embeddings and scalars: every parameter except weight matrices/kernels."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        param.ndim < 2  # biases, LayerNorm/BatchNorm gains, logit scale/bias, class tokens
        or isinstance(owner, nn.Embedding)  # token tables
        or "embedding" in leaf  # positional embeddings stored as bare Parameters
        or any(s in name for s in skip)
    )


def weight_decay_param_groups(module: nn.Module, weight_decay: float | None = None, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two param groups (nanoGPT `configure_optimizers` style): weight matrices decay, the rest does not.

    Not decayed: ndim < 2 parameters (biases, norm gains, logit scale), `nn.Embedding` tables,
    parameters named `*embedding*`, names listed by `module.no_weight_decay()` (open_clip/timm
    convention) and names containing any of `skip`. The decay group keeps the optimizer's default
    weight decay unless `weight_decay` is given. Frozen parameters are left out; empty groups dropped.
    """
    skip = set(skip)
    if hasattr(module, "no_weight_decay"):
        skip |= set(module.no_weight_decay())
    owners = {f"{mod_name}.{p_name}" if mod_name else p_name: mod for mod_name, mod in module.named_modules() for p_name, _ in mod.named_parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        exact = name in skip
        (no_decay if exact or is_no_decay(name, param, owners[name], skip) else decay).append(param)
    decay_group: dict[str, Any] = {"params": decay, "name": "decay"}
    if weight_decay is not None:
        decay_group["weight_decay"] = weight_decay
    groups = [decay_group, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def param_groups(module: nn.Module, split_weight_decay: bool = True) -> list[dict[str, Any]]:
    """The parameter groups every stage hands its optimizer factory (the one place that decides).

    `split_weight_decay=True`: `weight_decay_param_groups` (nanoGPT: the optimizer's weight decay on
    weight matrices/kernels only; none on biases, norm gains, embeddings). `False`: one group holding
    `module.parameters()`, so every parameter decays at the optimizer's rate; the autoencoder's and
    LDM's default (their configs set weight_decay 0, and one group keeps old checkpoints resumable).
    """
    if split_weight_decay:
        return weight_decay_param_groups(module)
    return [{"params": list(module.parameters())}]


def _factory_target(factory: Callable) -> Callable:
    return factory.func if isinstance(factory, functools.partial) else factory


def uses_grad_scaler(module: Any) -> bool:
    """True when the Trainer of a LightningModule scales the loss (fp16 mixed precision: a `GradScaler`);
    False for bf16, fp32, and a module not attached to a Trainer."""
    try:
        trainer = module.trainer
    except (RuntimeError, AttributeError):  # not attached to a Trainer, or no LightningModule
        return False
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None


def build_optimizer(factory: Callable[..., Optimizer], params: Any, device: torch.device | str | None = None,
                    grad_scaler: bool = False) -> Optimizer:
    """Call an optimizer factory (a Hydra `_partial_`), switching on `fused=True` for CUDA parameters
    when the optimizer supports it and the config did not choose. Not under a `GradScaler`
    (`grad_scaler=True`, fp16): a fused optimizer unscales inside its step, so gradients could not be
    unscaled before clipping; bf16 and fp32 have no scaler and clip through `clip_gradients`."""
    kwargs: dict[str, Any] = {}
    device = torch.device(device) if device is not None else None
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    if device is not None and device.type == "cuda" and "fused" not in keywords and not grad_scaler:
        try:
            if "fused" in inspect.signature(_factory_target(factory)).parameters:
                kwargs["fused"] = True
        except (TypeError, ValueError):
            pass
    return factory(params, **kwargs)


def clip_gradients(module: Any, optimizer: Any, value: float | None, algorithm: str | None = "norm") -> None:
    """Clip the gradients of `optimizer`'s parameters (global norm, or `algorithm="value"`) for a LightningModule.

    Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside its step (fused
    AdamW: "does not allow for gradient clipping"), also under bf16, where nothing is scaled. Without a
    `GradScaler` the gradients are the true ones, so they are clipped here directly; with one (fp16), or for
    any other optimizer, Lightning clips (`module.clip_gradients`), as before."""
    if not value or value <= 0:
        return
    algorithm = algorithm or "norm"
    if algorithm not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
    if getattr(optimizer, "_step_supports_amp_scaling", False) and not uses_grad_scaler(module):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, value)
        else:
            torch.nn.utils.clip_grad_value_(params, value)
        return
    module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


@dataclass
class WarmupCosine:
    """LR multiplier: linear warmup from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio`
    at `total_steps` (SGDR, Loshchilov & Hutter 2017, without restarts). A picklable object (not a
    lambda) so `LambdaLR.state_dict()` round-trips through `torch.load(weights_only=True)`."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Warmup + cosine `LambdaLR`; step it every optimizer step (Lightning `interval: step`)."""
    if total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        raise ValueError(
            f"warmup_cosine_schedule needs a finite total_steps, got {total_steps!r}: set trainer.max_steps "
            "(or trainer.max_epochs) or pass the scheduler total_steps explicitly."
        )
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    # short debug runs (fast_dev_run, max_steps=20) stay inside the warmup instead of failing
    warmup_steps = min(int(warmup_steps), int(total_steps))
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, int(total_steps), float(min_lr_ratio)))


def build_scheduler(factory: Callable[..., Any] | None, optimizer: Optimizer, trainer: Any | None = None) -> dict[str, Any] | None:
    """Lightning `lr_scheduler` dict (`interval: step`) from a scheduler factory; fills in
    `total_steps` from `trainer.estimated_stepping_batches` unless the config set it."""
    if factory is None:
        return None
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    kwargs: dict[str, Any] = {}
    try:
        wants_total = "total_steps" in inspect.signature(_factory_target(factory)).parameters
    except (TypeError, ValueError):
        wants_total = False
    if wants_total and keywords.get("total_steps") is None and trainer is not None:
        kwargs["total_steps"] = trainer.estimated_stepping_batches
    return {"scheduler": factory(optimizer, **kwargs), "interval": "step", "frequency": 1}
