"""Pixel conversions, one convention for the whole project (data, logging, eval, txt2img).

Batches hold float images in [-1, 1]; files hold 8-bit pixels. Float -> uint8 clamps to the range,
scales in float32 and rounds half to even (`torch.round`): [-1, 1] maps by (x + 1) * 127.5, so
-1 -> 0, 1 -> 255, 0 -> 127.5 -> 128 (even); [0, 1] (image grids) maps by x * 255. uint8 -> float
is p / 127.5 - 1, which the float -> uint8 direction inverts exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIGNED = (-1.0, 1.0)  # the batch convention
UNIT = (0.0, 1.0)  # image grids, metrics that want [0, 1]


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = SIGNED) -> torch.Tensor:
    """Float images (any shape) in `value_range` -> uint8 [0, 255], as a saved PNG holds them."""
    x = images.detach().float()
    if tuple(value_range) == SIGNED:
        x = (x.clamp(-1, 1) + 1) * 127.5
    elif tuple(value_range) == UNIT:
        x = x.clamp(0, 1) * 255
    else:
        raise ValueError(f"value_range must be (-1, 1) or (0, 1), got {value_range!r}")
    return x.round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor, value_range: tuple[float, float] = SIGNED) -> torch.Tensor:
    """uint8 (or integer-valued) pixels in [0, 255] -> float32 in [-1, 1] (or [0, 1]: p / 255, as ToTensor)."""
    if tuple(value_range) == UNIT:
        return pixels.float() / 255
    if tuple(value_range) != SIGNED:
        raise ValueError(f"value_range must be (-1, 1) or (0, 1), got {value_range!r}")
    return pixels.float().div(127.5).sub(1.0)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape} (mode {image.mode})")
    return from_uint8(torch.from_numpy(array.copy()).permute(2, 0, 1))


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8 array (what a PNG stores)."""
    return to_uint8(image.cpu()).permute(1, 2, 0).numpy()


def to_pil(image: Image.Image | torch.Tensor | np.ndarray, value_range: tuple[float, float] = SIGNED) -> Image.Image:
    """One image as PIL: PIL passes through; uint8 (C, H, W) / (H, W, C) arrays or tensors, or float
    tensors in `value_range`, become RGB (3 channels) or L (1 channel)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = to_uint8(image, value_range)
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels or a float tensor in {list(value_range)}, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"expected one image (C, H, W) or (H, W, C), got shape {array.shape}")
    return Image.fromarray(array)
