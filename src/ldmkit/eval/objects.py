"""Finding, counting and reading the objects of a `shapes`-like image: the object judge of the compositional
suite (`ldmkit.eval.compositional`).

Objects are found by measurement, not learnt: the data draws saturated palette colours on near-neutral
backgrounds, so an object pixel is one whose chroma (max - min of RGB) exceeds `chroma_threshold`, and its
8-connected regions, at least `min_area` of the image, are the objects. A region whose mass profile along x
or y has a valley below `split_ratio` of the lower peak beside it is two objects that touch (two large
triangles side by side meet at their base corners: profile ratio <= 0.21; crosses arm to arm <= 0.38; no
single shape goes below 0.67) and is cut there, whatever their colours. An object's colour is the palette
colour nearest in hue to most of its pixels (chroma-weighted vote): a sample whose blue drifts to cyan at
an edge stays one blue object, where splitting regions by colour would count it twice. That gives the
count, each object's colour, and its position (the chroma-weighted centroid's nearest anchor: left, right,
top, bottom, centre). What each object *is*
(shape, size) is read by the single-object attribute classifier (`ldmkit.eval.attributes`) on the image
with every other object painted over by the background around it, so the classifier sees the one-object
scenes it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: thin star tips stay attached at 32 px


@dataclass
class FoundObject:
    colour: str
    position: str
    x: float  # chroma-weighted centroid, fractions of the width / height
    y: float
    area: float  # fraction of the image
    mask: np.ndarray  # (H, W) bool


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle (radians) of RGB in [0, 1] (..., 3), from the opponent axes (2R - G - B, sqrt(3)(G - B))."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)


def _valley(mask: np.ndarray) -> tuple[float, int, int]:
    """(depth, axis, index) of the deepest valley of the mask's column (axis 1) or row (axis 0) profile:
    depth = profile[m] / min(highest profile before m, highest after m); 1 or more for one convex blob."""
    best = (np.inf, 0, 0)
    for axis in (0, 1):
        profile = mask.sum(axis=1 - axis).astype(np.float64)  # axis 1: per column
        before = np.maximum.accumulate(profile)[:-2]
        after = np.maximum.accumulate(profile[::-1])[::-1][2:]
        lower = np.minimum(before, after)
        depth = np.where(lower > 0, profile[1:-1] / np.maximum(lower, 1e-12), np.inf)
        if depth.size and depth.min() < best[0]:
            best = (float(depth.min()), axis, int(depth.argmin()) + 1)
    return best


def _split_touching(mask: np.ndarray, min_pixels: float, split_ratio: float, depth: int = 2) -> list[np.ndarray]:
    """The mask as one object, or cut at its deepest profile valley into objects that touch."""
    ratio, axis, index = _valley(mask)
    if depth == 0 or ratio >= split_ratio:
        return [mask]
    coordinate = np.arange(mask.shape[axis]).reshape((-1, 1) if axis == 0 else (1, -1))
    parts = [mask & (coordinate < index), mask & (coordinate > index)]
    if min(p.sum() for p in parts) < min_pixels:
        return [mask]
    return [piece for part in parts for piece in _split_touching(part, min_pixels, split_ratio, depth - 1)]


def find_objects(image: torch.Tensor, palette: Mapping[str, Sequence[int]], anchors: Mapping[str, Sequence[float]],
                 chroma_threshold: float = 0.3, min_area: float = 6 / 1024,
                 split_ratio: float = 0.5) -> list[FoundObject]:
    """Objects of one image (3, H, W) in [-1, 1], largest first."""
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()  # (H, W, 3)
    height, width = rgb.shape[:2]
    chroma = rgb.max(-1) - rgb.min(-1)
    names = list(palette)
    palette_hue = _hue(np.array([palette[c] for c in names], dtype=np.float64) / 255.0)
    nearest = np.abs(np.angle(np.exp(1j * (_hue(rgb)[..., None] - palette_hue)))).argmin(-1)  # (H, W)
    saturated = chroma > chroma_threshold
    ys, xs = np.mgrid[0:height, 0:width]
    labels, count = ndimage.label(saturated, _EIGHT)
    min_pixels = min_area * height * width
    regions = [region for region in (labels == k for k in range(1, count + 1)) if region.sum() >= min_pixels]
    found = []
    for mask in (piece for region in regions for piece in _split_touching(region, min_pixels, split_ratio)):
        weight = chroma[mask]
        colour = names[int(np.bincount(nearest[mask], weights=weight, minlength=len(names)).argmax())]
        x = float(((xs[mask] + 0.5) * weight).sum() / weight.sum() / width)
        y = float(((ys[mask] + 0.5) * weight).sum() / weight.sum() / height)
        position = min(anchors, key=lambda p: (anchors[p][0] - x) ** 2 + (anchors[p][1] - y) ** 2)
        found.append(FoundObject(colour, position, x, y, float(mask.mean()), mask))
    return sorted(found, key=lambda o: -o.area)


def paint_over(image: torch.Tensor, objects: Sequence[FoundObject], keep: int, sigma: float = 4.0) -> torch.Tensor:
    """`image` (3, H, W) with every object but `objects[keep]` replaced by the background around it:
    a normalised Gaussian average of the pixels that belong to no object (smooth gradients and waves
    continue under the painted area)."""
    pixels = image.detach().float().cpu().numpy()
    anywhere = np.zeros(pixels.shape[1:], dtype=bool)
    for obj in objects:
        anywhere |= obj.mask
    background = ~ndimage.binary_dilation(anywhere, _EIGHT, iterations=2)  # antialiased rims are not background
    if not background.any():  # objects everywhere: nothing to paint with
        return torch.from_numpy(pixels)
    weight = ndimage.gaussian_filter(background.astype(np.float64), sigma, mode="nearest")
    fill = np.stack([ndimage.gaussian_filter(c * background, sigma, mode="nearest") for c in pixels])
    fill = np.where(weight > 1e-3, fill / np.maximum(weight, 1e-12), pixels[:, background].mean(1)[:, None, None])
    others = np.zeros_like(anywhere)
    for i, obj in enumerate(objects):
        if i != keep:
            others |= obj.mask
    others = ndimage.binary_dilation(others, _EIGHT) & ~objects[keep].mask
    return torch.from_numpy(np.where(others[None], fill, pixels).astype(np.float32))


class ObjectJudge:
    """Reads every object of a batch of images: [[{"colour", "shape", "size", "position", "x", "y"}, ...], ...].

    `classifier` is an `AttributeClassifier` with shape and size heads; `palette` and `anchors` come from the
    data's `attribute_task()` hook.
    """

    def __init__(self, classifier: torch.nn.Module, palette: Mapping[str, Sequence[int]],
                 anchors: Mapping[str, Sequence[float]], chroma_threshold: float = 0.3, min_area: float = 6 / 1024):
        self.classifier, self.palette, self.anchors = classifier, dict(palette), dict(anchors)
        self.chroma_threshold, self.min_area = chroma_threshold, min_area

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[list[dict]]:
        found = [find_objects(im, self.palette, self.anchors, self.chroma_threshold, self.min_area) for im in images]
        singles, owners = [], []
        for i, objects in enumerate(found):
            for k in range(len(objects)):
                alone = images[i].detach().float().cpu() if len(objects) == 1 else paint_over(images[i], objects, k)
                singles.append(alone)
                owners.append((i, k))
        read: list[list[dict]] = [[] for _ in found]
        if not singles:
            return read
        device = next(self.classifier.parameters()).device
        predictions = self.classifier.predict(torch.stack(singles).to(device))
        for (i, k), prediction in zip(owners, predictions):
            obj, seen = found[i][k], prediction["objects"][0]
            read[i].append({"colour": obj.colour, "shape": seen["shape"], "size": seen["size"],
                            "position": obj.position, "x": round(obj.x, 3), "y": round(obj.y, 3)})
        return read
