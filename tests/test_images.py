"""ldmkit.images is the one pixel convention: its rounding, and bit-identity with the formulas each
caller (data, logging, FID, PNG metadata, digits) used before they shared it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.digits import upscale_digits
from ldmkit.data.images import pil_to_tensor, tensor_to_uint8
from ldmkit.eval.fid import to_uint8_images
from ldmkit.eval.pngmeta import to_pil_image
from ldmkit.images import UNIT, from_uint8, to_pil, to_uint8
from ldmkit.lit.images import to_pil as grid_to_pil


def test_rounding_convention_clamps_scales_and_rounds_half_to_even():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, -0.5])
    # -1 -> 0, 0 -> 127.5 -> 128 (tie, even), 1 -> 255, -0.5 -> 63.75 -> 64; out of range clamps
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 64]
    # exact ties k + 0.5 (these k give one in float32) go to the even neighbour: 64.5 -> 64, 65.5 -> 66
    ties = (torch.tensor([64.0, 65.0]) + 0.5) / 127.5 - 1
    assert ((ties + 1) * 127.5).tolist() == [64.5, 65.5] and to_uint8(ties).tolist() == [64, 66]
    assert to_uint8(torch.tensor([0.5 / 255, 2.5 / 255, 0.5, -0.1, 2.0]), UNIT).tolist() == [0, 2, 128, 0, 255]


def test_uint8_round_trips_exactly():
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(pixels)), pixels)
    assert from_uint8(pixels)[[0, 255]].tolist() == [-1.0, 1.0]
    assert torch.equal(from_uint8(pixels, UNIT), pixels.float() / 255)  # ToTensor's convention (feature extractors)
    assert torch.equal(to_uint8(from_uint8(pixels, UNIT), UNIT), pixels)


def test_half_precision_inputs_are_quantised_in_float32():
    x = torch.rand(4096) * 2 - 1
    assert torch.equal(to_uint8(x.half()), to_uint8(x.half().float()))


def test_callers_are_bit_identical_to_their_former_formulas():
    torch.manual_seed(0)
    batch = torch.rand(2, 3, 17, 19) * 2.4 - 1.2  # (B, 3, H, W), some values outside [-1, 1]
    former = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # data/images, fid, pngmeta
    assert torch.equal(to_uint8_images(batch), former)
    np.testing.assert_array_equal(tensor_to_uint8(batch[0]), former[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(np.asarray(to_pil_image(batch[1])), former[1].permute(1, 2, 0).numpy())
    grid = torch.rand(3, 10, 12) * 1.2 - 0.1
    former_grid = (grid.float().clamp(0, 1) * 255).round().to(torch.uint8)  # lit/images.to_pil
    np.testing.assert_array_equal(np.asarray(grid_to_pil(grid)), former_grid.permute(1, 2, 0).numpy())
    assert grid_to_pil(grid[:1]).mode == "L"
    digits = torch.rand(3, 8, 8) * 16
    up = torch.nn.functional.interpolate(digits[:, None] / 16, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.equal(upscale_digits(digits.numpy(), 32), (up.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8))


def test_pil_round_trip_and_layouts():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(rgb))  # (3, H, W) in [-1, 1]
    np.testing.assert_array_equal(tensor_to_uint8(tensor), rgb)
    np.testing.assert_array_equal(np.asarray(to_pil(torch.from_numpy(rgb))), rgb)  # (H, W, C) uint8 tensor
    np.testing.assert_array_equal(np.asarray(to_pil(rgb.transpose(2, 0, 1))), rgb)  # (C, H, W) array
    with pytest.raises(ValueError, match="value_range must be"):
        to_uint8(tensor, (0, 255))
    with pytest.raises(ValueError, match="got dtype float64"):
        to_pil(rgb.astype(np.float64))
