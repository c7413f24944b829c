"""Generation parameters inside PNGs, in the AUTOMATIC1111 "parameters" text-chunk convention:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: dpmpp_2m, CFG scale: 4.0, Seed: 123, Size: 32x32, Model hash: abc123, Model: name

so samples open with their settings in A1111 "PNG Info", ComfyUI, exiftool, etc. The parser
follows A1111's `parse_generation_parameters` (modules/infotext_utils.py): the last line holds
the `Key: value` pairs when it has at least 3 of them; values with `,` `:` or newlines are
JSON-quoted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldmkit.eval.files import write_file
from ldmkit.images import to_pil

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# A1111's re_param_code: `Key: value` where value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class GenerationParameters:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    size: tuple[int, int] | None = None  # (width, height)
    model_hash: str | None = None
    model: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # any other `Key: value`, e.g. "Schedule": "cosine"


# dataclass field -> A1111 key, in A1111's order
_KEYS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
}


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:\n"') else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def format_parameters(params: GenerationParameters) -> str:
    pairs: dict[str, Any] = {key: getattr(params, name) for name, key in _KEYS.items()}
    if params.size is not None:
        pairs["Size"] = f"{params.size[0]}x{params.size[1]}"
    pairs.update(params.extra)
    settings = ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs.items() if value is not None)
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {params.negative_prompt}")
    lines.append(settings)
    return "\n".join(lines)


def parse_parameters(text: str) -> GenerationParameters:
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no settings line: everything is prompt text
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX) and not negative:
            negative.append(line[len(NEGATIVE_PREFIX) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    values = {key.strip(): _unquote(value.strip()) for key, value in _PARAM.findall(last)}

    params = GenerationParameters(prompt="\n".join(prompt), negative_prompt="\n".join(negative))
    converters = {"steps": int, "cfg_scale": float, "seed": int, "size": _parse_size}
    for name, key in _KEYS.items():
        if key in values:
            raw = values.pop(key)
            try:
                setattr(params, name, converters.get(name, str)(raw))
            except ValueError:
                params.extra[key] = raw  # keep what we cannot type rather than lose it
    params.extra.update(values)
    return params


def _parse_size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"Size must look like WIDTHxHEIGHT, got {text!r}")
    return int(match[1]), int(match[2])


def to_pil_image(image: Image.Image | torch.Tensor | np.ndarray) -> Image.Image:
    """PIL passes through; uint8 (3, H, W) / (H, W, 3) arrays or tensors, or float tensors in
    [-1, 1] (the batch convention) become an RGB image (`ldmkit.images.to_pil`)."""
    return to_pil(image)


def save_png_with_parameters(
    image: Image.Image | torch.Tensor | np.ndarray, path: str | os.PathLike, params: GenerationParameters,
    *, overwrite: bool = True,
) -> Path:
    """Write `image` as PNG with `params` in a "parameters" text chunk (tEXt, or iTXt when the
    text is not Latin-1). `params.size` defaults to the image's size. Written atomically; with
    overwrite=False an existing file is kept and FileExistsError raised."""
    pil = to_pil_image(image)
    if params.size is None:
        params = dataclasses.replace(params, size=pil.size)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(params))
    return write_file(path, lambda f: pil.save(f, format="PNG", pnginfo=info), overwrite=overwrite)


def read_png_parameters(path: str | os.PathLike) -> GenerationParameters | None:
    """The parameters saved in a PNG, or None when it has no "parameters" chunk."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(PARAMETERS_KEY) or image.info.get(PARAMETERS_KEY)
    return None if text is None else parse_parameters(text)
