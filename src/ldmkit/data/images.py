"""Decode any PIL image to RGB, resize + centre-crop, and convert to/from the batch tensor range."""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from ldmkit.images import pil_to_tensor, tensor_to_uint8  # noqa: F401 (the one conversion module)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def validate_resolution(resolution: object, minimum: int = 1, source: str = "data") -> int:
    """Return `resolution` as an int, or raise a ValueError that names the fix."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < minimum:
        raise ValueError(
            f"{source}: resolution must be an int >= {minimum}, got {resolution!r}; "
            f"set e.g. data.resolution=32 (64 and 128 also work)"
        )
    return int(resolution)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB.

    16-bit greyscale (I;16*, and I as PNG decodes it) is scaled by 255/65535 rather than clipped;
    anything with transparency (RGBA, LA, PA, P/L with a transparency key) is composited on
    `background`; CMYK, YCbCr, LAB, HSV, 1, F go through PIL's own conversions.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255, which turns most images white.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0  # float images in [0, 1] or [0, 255]
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Crop the central square and resize it to `resolution` (antialiased bicubic); exact when sizes match."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if (width, height) != (side, side):
        image = image.crop(box)  # crop first: resize(box=...) would blend in pixels outside the box
    if side == resolution:
        return image
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)


def open_image(source: bytes | str | BinaryIO) -> Image.Image:
    """Open image bytes / a path lazily (only the header is read until pixels are needed)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    return Image.open(source)


def load_rgb(image: Image.Image, resolution: int) -> Image.Image:
    """Decode an opened image at `resolution`: draft-decode JPEGs, apply EXIF rotation, RGB, crop, resize."""
    if image.format == "JPEG":
        # DCT-domain downscale: never smaller than requested, much faster for large photos.
        image.draft("RGB", (resolution, resolution))
    image = ImageOps.exif_transpose(image) if image.getexif() else image
    return center_crop_resize(to_rgb(image), resolution)


def encode_image(image: torch.Tensor, fmt: str = "png") -> bytes:
    """(3, H, W) tensor in [-1, 1] -> encoded PNG/JPEG/WEBP bytes."""
    fmt = fmt.lower().lstrip(".")
    pil_format = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(fmt)
    if pil_format is None:
        raise ValueError(f"image_format must be png, jpg or webp, got {fmt!r}")
    buffer = io.BytesIO()
    options = {"quality": 95} if pil_format in ("JPEG", "WEBP") else {"compress_level": 1}
    Image.fromarray(tensor_to_uint8(image)).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


class SkipSample(Exception):
    """Raised by loaders for a sample that should be skipped and counted under `reason`."""

    def __init__(self, reason: str, detail: object = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_image_tensor(
    source: bytes | str | BinaryIO,
    resolution: int,
    min_size: int = 0,
    max_aspect_ratio: float | None = None,
) -> torch.Tensor:
    """Decode, filter, convert to RGB, crop + resize -> (3, R, R) in [-1, 1], or raise SkipSample.

    `min_size` (shorter side, pixels) and `max_aspect_ratio` (long / short side) are checked on the
    header before the pixels are decoded.
    """
    try:
        image = open_image(source)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        raise SkipSample("unreadable_file", error) from error
    except Exception as error:  # PIL raises several types for garbage bytes
        raise SkipSample("decode_error", error) from error
    with image:
        width, height = image.size
        if min(width, height) < max(min_size, 1):
            raise SkipSample("too_small", f"{width}x{height} < min_size {min_size}")
        if max_aspect_ratio is not None and max(width, height) / min(width, height) > max_aspect_ratio:
            raise SkipSample("bad_aspect", f"{width}x{height} exceeds max_aspect_ratio {max_aspect_ratio}")
        try:
            return pil_to_tensor(load_rgb(image, resolution))
        except Exception as error:  # truncated data, unsupported mode, decompression bomb, ...
            raise SkipSample("decode_error", error) from error
