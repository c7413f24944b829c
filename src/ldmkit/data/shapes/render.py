"""Drawing `shapes` scenes: signed distance functions with analytic coverage antialiasing
(``alpha = clamp(0.5 - distance_in_pixels, 0, 1)``) on a `supersample`-times finer grid that is then
box-filtered down, for a whole batch at once."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ldmkit.data.images import validate_resolution
from ldmkit.data.shapes.scenes import (
    BACKGROUND_STYLES, BACKGROUNDS, COLOURS, MIN_RESOLUTION, POSITIONS, SHAPES, SIZES, _empty_scene, _fill_background,
    _fill_object, _uniforms, complete_attributes, sample_keys,
)

# Signed distance functions, negative inside; p = (x, y) relative to the bounding-box centre, y
# pointing *up*, in units of the image width. Formulas after Inigo Quilez, "2D distance functions".


def _sdf_circle(x, y, e):
    return torch.sqrt(x * x + y * y) - 0.45 * e  # diameter = the square's side: corners tell them apart


def _sdf_box(x, y, half_w, half_h):
    qx, qy = x.abs() - half_w, y.abs() - half_h
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sdf_square(x, y, e):
    return _sdf_box(x, y, 0.45 * e, 0.45 * e)  # corners well outside the circle: distinct even when small


def _sdf_diamond(x, y, e):
    a, b = 0.36 * e, 0.5 * e  # taller than wide, so it never reads as a rotated square
    return (x.abs() / a + y.abs() / b - 1.0) * (a * b / torch.sqrt(a * a + b * b))


def _sdf_triangle(x, y, e):
    """Equilateral triangle pointing up, height 0.95 * extent, bounding box centred."""
    k = math.sqrt(3.0)
    height = 0.95 * e
    r = height / k  # half side
    y = y + height / 6  # centroid sits height/6 below the bounding-box centre
    x = x.abs() - r
    y = y + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * r), torch.zeros_like(x))
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def _sdf_star(x, y, e):
    """Five-pointed star (iq's sdStar5), outer radius 0.52 * extent, inner ratio 0.45."""
    r = 0.52 * e
    y = y + 0.095 * r  # tips reach r up but only 0.81 r down: centre the bounding box
    k1x, k1y = 0.809016994375, -0.587785252292
    x = x.abs()
    d = (k1x * x + k1y * y).clamp(min=0)
    x, y = x - 2 * d * k1x, y - 2 * d * k1y
    d = (-k1x * x + k1y * y).clamp(min=0)
    x, y = x + 2 * d * k1x, y - 2 * d * k1y
    x = x.abs()
    y = y - r
    bax, bay = 0.45 * -k1y, 0.45 * k1x - 1.0
    h = ((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(min=0)
    h = torch.minimum(h, r)
    return torch.sqrt((x - bax * h) ** 2 + (y - bay * h) ** 2) * torch.sign(y * bax - x * bay)


def _sdf_cross(x, y, e):
    arm, thick = 0.5 * e, 0.17 * e
    return torch.minimum(_sdf_box(x, y, arm, thick), _sdf_box(x, y, thick, arm))


_SDF = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_diamond, _sdf_star, _sdf_cross)
assert len(_SDF) == len(SHAPES)


def default_supersample(resolution: int) -> int:
    """Grid refinement that keeps a >= 64 px drawing grid (analytic AA does the rest)."""
    return max(1, math.ceil(64 / resolution))


def _box_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, S, S) -> (N, S/f, S/f) mean over f x f blocks (strided adds: ~3x faster than avg_pool2d on CPU)."""
    rows = x[:, 0::factor]
    for i in range(1, factor):
        rows = rows + x[:, i::factor]
    out = rows[:, :, 0::factor]
    for j in range(1, factor):
        out = out + rows[:, :, j::factor]
    return out.mul_(1.0 / (factor * factor))


def render_scenes(scene: dict[str, np.ndarray], resolution: int, supersample: int | None = None) -> torch.Tensor:
    """Render scene parameters from `sample_scenes` -> (N, 3, R, R) float32 in [-1, 1]."""
    ss = default_supersample(resolution) if supersample is None else int(supersample)
    n = len(scene["bg_style"])

    def col(a: np.ndarray, *shape: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).view(*shape)

    def grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        return coords.view(1, 1, size), coords.view(1, size, 1)  # x right, y down

    # Background (smooth, drawn at the output size): level + (gradient ramp | sine waves) along a
    # random direction, the same on all channels.
    gx, gy = grid(resolution)
    angle = col(scene["bg_angle"], n, 1, 1)
    along = (gx - 0.5) * torch.cos(angle) + (gy - 0.5) * torch.sin(angle)  # (N, R, R)
    style = torch.from_numpy(scene["bg_style"]).view(n, 1, 1)
    delta = col(scene["bg_delta"], n, 1, 1)
    waves = torch.sin(2 * math.pi * col(scene["bg_freq"], n, 1, 1) * along + col(scene["bg_phase"], n, 1, 1))
    field = torch.where(style == 1, delta * along, torch.where(style == 2, delta * waves, torch.zeros(())))
    image = col(scene["bg_rgb"], n, 3, 1, 1) + field.unsqueeze(1)  # (N, 3, R, R)

    # Objects: coverage from the SDF on an ss-times finer grid, box-filtered to the output size, then
    # one flat-colour composite per object slot (a scene's two objects sit at opposite positions; wide ones
    # can touch).
    size = resolution * ss
    gx, gy = grid(size)
    for slot in range(scene["present"].shape[1]):
        if not scene["present"][:, slot].any():
            continue
        coverage = torch.zeros(n, size, size)
        for shape_id, sdf in enumerate(_SDF):
            rows = np.flatnonzero(scene["present"][:, slot] & (scene["shape"][:, slot] == shape_id))
            if rows.size == 0:
                continue
            m = rows.size
            x = gx - col(scene["cx"][rows, slot], m, 1, 1)
            y = col(scene["cy"][rows, slot], m, 1, 1) - gy  # flip to y-up for the SDFs
            distance = sdf(x, y, col(scene["extent"][rows, slot], m, 1, 1))  # (m, S, S) in image widths
            coverage[torch.from_numpy(rows)] = (0.5 - distance * size).clamp_(0.0, 1.0)
        if ss > 1:
            coverage = _box_downsample(coverage, ss)
        image = torch.lerp(image, col(scene["rgb"][:, slot], n, 3, 1, 1), coverage.unsqueeze(1))
    return image.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


def render_attributes(
    attributes: dict | Sequence[dict],
    resolution: int = 32,
    seed: int = 0,
    jitter: bool = True,
    supersample: int | None = None,
) -> torch.Tensor:
    """Draw reference images for (partial) attributes -> (N, 3, R, R) in [-1, 1].

    Missing fields are completed with `complete_attributes(attrs, seed + i)`; `jitter` adds the
    generator's small position/size/colour variation (seeded), `jitter=False` draws the prototype.
    """
    resolution = validate_resolution(resolution, MIN_RESOLUTION, "shapes")
    items = [attributes] if isinstance(attributes, dict) else list(attributes)
    scene = _empty_scene(len(items))
    u = _uniforms(sample_keys(seed, "test", np.arange(len(items))), 8 + 2 * 6)
    for i, item in enumerate(items):
        attrs = complete_attributes(item, seed + i)
        rows = np.array([i])
        _fill_background(
            scene, rows, np.array([BACKGROUNDS.index(attrs["background"])]),
            np.array([BACKGROUND_STYLES.index(attrs["background_style"])]), u[i : i + 1, 0:8],
        )
        for slot, obj in enumerate(attrs["objects"]):
            ids = {
                "shape": np.array([SHAPES.index(obj["shape"])]),
                "colour": np.array([COLOURS.index(obj["colour"])]),
                "size": np.array([SIZES.index(obj["size"])]),
                "position": np.array([POSITIONS.index(obj["position"])]),
            }
            jit = u[i : i + 1, 8 + slot * 6 : 14 + slot * 6] if jitter else None
            _fill_object(scene, rows, slot, ids, jit)
    return render_scenes(scene, resolution, supersample)
