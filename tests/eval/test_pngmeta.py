from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.eval.pngmeta import (
    GenerationParameters,
    format_parameters,
    parse_parameters,
    read_png_parameters,
    save_png_with_parameters,
)

A1111_TEXT = (
    "a red circle above a blue square\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: dpmpp_2m, CFG scale: 4.0, Seed: 123, Size: 32x32, Model hash: abc123, Model: name"
)


def test_format_matches_a1111_convention():
    params = GenerationParameters(
        prompt="a red circle above a blue square", negative_prompt="blurry", steps=20, sampler="dpmpp_2m",
        cfg_scale=4.0, seed=123, size=(32, 32), model_hash="abc123", model="name",
    )
    assert format_parameters(params) == A1111_TEXT
    assert parse_parameters(A1111_TEXT) == params


def test_png_round_trip_in_text_chunk(tmp_path):
    params = GenerationParameters(
        prompt="two green triangles,\nsecond line", negative_prompt="text, watermark", steps=50,
        sampler="euler_a", cfg_scale=7.5, seed=2**40 + 3, model_hash="0badc0de", model="ldm: shapes, v2",
        extra={"Schedule": "cosine", "Eta": "0.0"},
    )
    image = torch.rand(3, 24, 40) * 2 - 1  # float [-1, 1], (3, H, W)
    path = save_png_with_parameters(image, tmp_path / "sample.png", params)

    assert b"tEXtparameters\x00" in path.read_bytes()  # a plain tEXt chunk named "parameters"
    loaded = read_png_parameters(path)
    assert loaded.size == (40, 24)  # filled in from the image: width x height
    assert loaded == GenerationParameters(**{**params.__dict__, "size": (40, 24)})
    pixels = np.asarray(Image.open(path))
    np.testing.assert_array_equal(pixels, ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_non_latin1_prompt_and_missing_chunk(tmp_path):
    params = GenerationParameters(prompt="un cercle rouge ☕", steps=4, sampler="ddim", cfg_scale=1.0, seed=0)
    path = save_png_with_parameters(np.zeros((8, 8, 3), np.uint8), tmp_path / "u.png", params)
    assert read_png_parameters(path).prompt == "un cercle rouge ☕"
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_png_parameters(tmp_path / "plain.png") is None


def test_parse_prompt_without_settings_and_unknown_keys():
    text = "just a prompt\nover two lines"
    assert parse_parameters(text) == GenerationParameters(prompt=text)
    parsed = parse_parameters("p\nSteps: 8, Sampler: heun, Seed: 5, Size: big, Clip skip: 2")
    assert (parsed.steps, parsed.sampler, parsed.seed, parsed.size) == (8, "heun", 5, None)
    assert parsed.extra == {"Size": "big", "Clip skip": "2"}


def test_rejects_float_pixels_outside_convention():
    with pytest.raises(ValueError, match="uint8"):
        save_png_with_parameters(np.zeros((4, 4, 3), np.float64), "unused.png", GenerationParameters(prompt=""))
