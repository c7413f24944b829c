"""Sample grids in the report: labels, sections (the samplers of one setting side by side), and PNGs upscaled by
an integer factor with nearest-neighbour (pixel replication: nothing is invented or smoothed) until a sample is
at least MIN_CELL_PX tall."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

from ldmkit.eval.metrics.base import missing
from ldmkit.eval.pngmeta import to_pil_image

MIN_CELL_PX = 128  # a 32x32 sample is shown 4x: 128x128
MAX_GRID_PX = 8192  # ... unless that makes the grid wider than this (then the largest factor that fits)


def _num(value: Any) -> float:
    """A sort key: missing values (None, NaN, "n/a") last."""
    return float("inf") if missing(value) else float(value)


def grid_label(key: Any) -> str:
    if isinstance(key, tuple) and len(key) == 3:
        sampler, steps, guidance = key
        return f"{sampler}, {steps} steps, guidance {guidance:g}"
    if isinstance(key, tuple) and len(key) == 4:
        label, sampler, steps, guidance = key
        return f"{label}: {sampler}, {steps} steps, guidance {guidance:g}"
    return str(key)


def _grid_sections(grids: Mapping[Any, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Group grids by (steps, guidance) so the samplers of one setting sit side by side."""
    labels = list(dict.fromkeys(key[0] for key in grids if isinstance(key, tuple) and len(key) == 4))

    def order(key: Any) -> tuple:
        if isinstance(key, tuple) and len(key) == 3:
            return (0, 0, _num(key[1]), _num(key[2]), str(key[0]))
        if isinstance(key, tuple) and len(key) == 4:  # labelled groups after the settings' own grids, in given order
            return (1, labels.index(key[0]), _num(key[2]), _num(key[3]), str(key[1]))
        return (2, 0, 0.0, 0.0, str(key))

    sections: dict[str, list[tuple[str, Any]]] = {}
    for key in sorted(grids, key=order):
        if isinstance(key, tuple) and len(key) == 3:
            sampler, steps, guidance = key
            sections.setdefault(f"{steps} steps, guidance {guidance:g}", []).append((str(sampler), grids[key]))
        elif isinstance(key, tuple) and len(key) == 4:
            label, sampler, steps, guidance = key
            sections.setdefault(f"{label}: {steps} steps, guidance {guidance:g}", []).append((str(sampler), grids[key]))
        else:
            sections.setdefault("samples", []).append((str(key), grids[key]))
    return list(sections.items())


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    to_pil_image(image).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def readable_grid(image: Any, cell_size: int | None = None) -> Image.Image:
    """The grid as RGB, upscaled by the smallest integer factor that makes a sample (`cell_size` px, default
    the image height) at least MIN_CELL_PX, by pixel replication (nearest-neighbour); capped so the grid
    stays within MAX_GRID_PX."""
    pil = to_pil_image(image).convert("RGB")
    cell = int(cell_size or pil.height)
    if cell < 1:
        raise ValueError(f"cell_size must be a positive number of pixels, got {cell_size!r}")
    factor = max(1, min(math.ceil(MIN_CELL_PX / cell), MAX_GRID_PX // max(pil.width, pil.height, 1)))
    return pil if factor == 1 else pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)


def png_data_uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
