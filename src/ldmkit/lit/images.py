"""Log a grid of images to whichever loggers a run has (W&B, TensorBoard, CSV → PNG files)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from ldmkit import images as pixels


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile (N, C, H, W) images in [0, 1] into one (C, H', W') image, `nrow` per row (default ~square)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = images.new_ones(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        row, col = divmod(i, nrow)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] (a grid) → 8-bit RGB (or L) PIL image."""
    return pixels.to_pil(image, value_range=pixels.UNIT)


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor], value_range: tuple[float, float]) -> torch.Tensor:
    batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
    if batch.ndim != 4:
        raise ValueError(f"log_image_grid expects images shaped (N, C, H, W), got {tuple(batch.shape)}")
    low, high = value_range
    return ((batch.detach().float() - low) / (high - low)).clamp(0, 1).cpu()


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


@rank_zero_only
def log_image_grid(
    loggers: Logger | Sequence[Logger] | None,
    key: str,
    images: torch.Tensor | Sequence[torch.Tensor],
    step: int,
    captions: Sequence[str] | None = None,
    *,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> list[Path]:
    """Log `images` (N, C, H, W), values in `value_range`, as one grid under `key` at `step`.

    W&B gets the grid (or, with `captions`, one captioned image each); TensorBoard gets
    `add_image` (+ the captions as text); a CSVLogger gets a PNG (+ a .txt of captions)
    under `<log_dir>/images/`. Other loggers are skipped. Returns the files written.
    """
    if loggers is None:
        return []
    loggers = [loggers] if isinstance(loggers, Logger) else list(loggers)
    batch = _as_batch(images, value_range)
    if captions is not None and len(captions) != len(batch):
        raise ValueError(f"log_image_grid got {len(batch)} images but {len(captions)} captions")
    grid = make_grid(batch, nrow=nrow)  # (C, H', W') in [0, 1]
    written: list[Path] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if captions is not None:
                logger.log_image(key=key, images=[to_pil(im) for im in batch], step=step, caption=list(captions))
            else:
                logger.log_image(key=key, images=[to_pil(grid)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
            if captions is not None:
                logger.experiment.add_text(f"{key}/captions", "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions)), global_step=step)
        elif isinstance(logger, CSVLogger):
            folder = Path(logger.log_dir) / "images"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{_safe_name(key)}_step{step:07d}.png"
            to_pil(grid).save(path)
            written.append(path)
            if captions is not None:
                text = path.with_suffix(".txt")
                text.write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))
                written.append(text)
    return written
