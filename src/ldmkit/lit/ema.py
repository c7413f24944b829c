"""Exponential moving average of a network's weights.

The shadow copy is a registered submodule, so it follows the LightningModule across
devices and lands in (and is restored from) every checkpoint. The decay is given
directly or as a half-life in training images (Karras et al. 2022, EDM, sec. C.2:
beta = 0.5 ** (images_per_step / half_life_images)), which keeps the averaging
horizon fixed when the global batch size changes with the number of GPUs.
"""

from __future__ import annotations

import copy
import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float | None = 0.999, half_life_images: float | None = None, warmup_steps: int = 0) -> None:
        super().__init__()
        if (decay is None) == (half_life_images is None):
            raise ValueError(f"EMA needs exactly one of decay ({decay}) or half_life_images ({half_life_images}); set the other to null.")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.half_life_images = half_life_images
        self.warmup_steps = warmup_steps
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def beta(self, images_per_step: int) -> float:
        beta = self.decay if self.decay is not None else 0.5 ** (images_per_step / self.half_life_images)
        return beta

    @torch.no_grad()
    def update(self, model: nn.Module, images_per_step: int, step: int) -> None:
        """shadow <- beta * shadow + (1 - beta) * model; a plain copy during warm-up. No host syncs."""
        beta = 0.0 if step < self.warmup_steps else self.beta(images_per_step)
        shadow = [p for p in self.shadow.parameters()]
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(shadow, live, 1.0 - beta)
        for b_shadow, b_live in zip(self.shadow.buffers(), model.buffers()):
            b_shadow.copy_(b_live)
        self.num_updates += 1
