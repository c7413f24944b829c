from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.images import (
    SkipSample,
    center_crop_resize,
    encode_image,
    load_image_tensor,
    pil_to_tensor,
    tensor_to_uint8,
    to_rgb,
)

from .helpers import gradient_png, image_bytes


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    data = _png(Image.fromarray(values))  # 16-bit greyscale PNG
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode.startswith("I")
    rgb = np.asarray(to_rgb(reopened))
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 64], [128, 255]])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgb = np.asarray(to_rgb(Image.open(io.BytesIO(_png(rgba)))))
    assert tuple(rgb[3, 3]) == (255, 255, 255)  # transparent -> white, not black or red
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert abs(int(rgb[0, 1, 0]) - 127) <= 2  # half-transparent black over white


def test_palette_with_transparency_greyscale_la_and_cmyk():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(Image.open(io.BytesIO(_png(palette)))))[0, 0]) == (255, 255, 255)
    grey = np.asarray(to_rgb(Image.open(io.BytesIO(image_bytes("L", value=77)))))
    assert grey.shape[2] == 3 and (grey == 77).all()
    la = np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 0))))
    assert (la == 255).all()
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG")
    r, g, b = np.asarray(to_rgb(Image.open(buffer)))[0, 0].astype(int)
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "1", "CMYK", "LA"])
def test_load_image_tensor_any_mode(mode):
    value = {"RGBA": (10, 20, 30, 255), "CMYK": (0, 0, 0, 0), "LA": (50, 255), "I;16": 30000}.get(mode, 1)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    tensor = load_image_tensor(image_bytes(mode, (40, 30), fmt, value), 16)
    assert tensor.shape == (3, 16, 16)
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    if mode == "I;16":
        assert abs(float(tensor.mean()) - (30000 / 65535 * 2 - 1)) < 0.01


def test_center_crop_resize_and_exact_roundtrip():
    wide = Image.new("RGB", (60, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (20, 0, 40, 20))  # white central square
    out = np.asarray(center_crop_resize(wide, 10))
    assert out.shape == (10, 10, 3) and out.min() > 240  # only the centre survives the crop
    data = gradient_png(32, seed=1)
    tensor = load_image_tensor(data, 32)
    np.testing.assert_array_equal(tensor_to_uint8(tensor), np.asarray(Image.open(io.BytesIO(data))))
    again = load_image_tensor(encode_image(tensor, "png"), 32)
    assert (again - tensor).abs().max() == 0
    assert pil_to_tensor(Image.new("RGB", (2, 2), (255, 0, 0)))[0].eq(1).all()


def test_skip_reasons():
    with pytest.raises(SkipSample) as garbage:
        load_image_tensor(b"definitely not an image", 16)
    assert garbage.value.reason == "decode_error"
    truncated = gradient_png(64)[:300]
    with pytest.raises(SkipSample) as cut:
        load_image_tensor(truncated, 16)
    assert cut.value.reason == "decode_error"
    with pytest.raises(SkipSample) as small:
        load_image_tensor(image_bytes("RGB", (20, 10)), 16, min_size=16)
    assert small.value.reason == "too_small"
    with pytest.raises(SkipSample) as aspect:
        load_image_tensor(image_bytes("RGB", (90, 30)), 16, max_aspect_ratio=2.0)
    assert aspect.value.reason == "bad_aspect"
    with pytest.raises(SkipSample) as missing:
        load_image_tensor("/nonexistent/image.png", 16)
    assert missing.value.reason == "unreadable_file"
    assert load_image_tensor(image_bytes("RGB", (90, 30)), 16, min_size=16, max_aspect_ratio=3.0).shape == (3, 16, 16)
