"""`shapes`: procedurally generated captioned images of coloured shapes (the embedded default dataset).

A sample is a pure function of ``(seed, split, index)``: a counter-based hash (splitmix64) turns
those three numbers into the uniform draws that pick the scene, so any index renders the same in
any worker, batch or process, and the train/val/test splits use disjoint hash streams.

Scenes hold one object (``1 - two_object_prob`` of them, 70% by default) or two objects at
opposite positions (left/right or top/bottom, so they never overlap). Each sample carries its
attributes so later stages can score prompt-following::

    {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "left"}],
     "background": "dark", "background_style": "gradient"}

Shapes are drawn from signed distance functions with analytic coverage antialiasing
(``alpha = clamp(0.5 - distance_in_pixels, 0, 1)``) on a `supersample`-times finer grid that is then
box-filtered down, for a whole batch at once (`ShapesDataset.__getitems__`, which DataLoader uses).
Use `make_caption` to build a prompt for given attributes and `render_attributes` to draw
reference images for them.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.images import validate_resolution

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("dark", "gray", "light")
BACKGROUND_STYLES = ("plain", "gradient", "waves")
MIN_RESOLUTION = 16

# Saturated, well separated in hue and lightness so every pair stays distinct at 32 px on any background.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (30, 175, 55),
    "blue": (35, 85, 235),
    "yellow": (245, 215, 25),
    "purple": (150, 55, 210),
    "cyan": (25, 210, 220),
}
_BACKGROUND_LEVEL = {"dark": (0.04, 0.20), "gray": (0.40, 0.55), "light": (0.80, 0.95)}
# Extent of a shape as a fraction of the image width, and where its bounding box is centred.
_SIZE_EXTENT = {"small": 0.30, "large": 0.46}
_POSITION_XY = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_JITTER = 0.015  # centre jitter (fraction of width) and +-6% size jitter: variety without overlap
_COLOUR_JITTER = 0.04

# Words used by captions; the first entry is the canonical one (`make_caption(..., rng=None)`).
_SHAPE_WORDS = {
    "circle": ("circle", "circle", "disk"),
    "square": ("square", "square", "square shape"),
    "triangle": ("triangle", "triangle", "triangle shape"),
    "diamond": ("diamond", "diamond", "rhombus"),
    "star": ("star", "star", "five-pointed star"),
    "cross": ("cross", "cross", "plus sign"),
}
_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big", "huge")}
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
_POSITION_SHORT = {
    "left": ("left side", "left"),
    "right": ("right side", "right"),
    "top": ("top", "upper half"),
    "bottom": ("bottom", "lower half"),
    "centre": ("centre", "center", "middle"),
}
_RELATION = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
_BACKGROUND_WORDS = {"dark": ("dark", "black"), "gray": ("gray", "grey"), "light": ("light", "white")}
_ALIASES = {"center": "centre", "grey": "gray", "big": "large", "little": "small", "color": "colour"}

# One template per line; {S} size, {C} colour, {H} shape, {P} position phrase, {p} short position.
_SINGLE_TEMPLATES = (
    "a {S} {C} {H} {P}",
    "{C} {H}, {p}, {S}",
    "{P}, a {S} {C} {H}",
    "there is a {S} {C} {H} {P}",
    "a picture of a {S} {C} {H} {P}",
    "a {S} {H} in {C} {P}",
    "{S} {C} {H} {P}",
)


# ----------------------------------------------------------------------------- deterministic draws

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Bijective 64-bit finaliser of SplitMix64 (Steele et al., 2014) on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, split: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """One 64-bit key per (seed, split, index); distinct splits never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
        key = _splitmix64(key ^ (np.uint64(SPLITS.index(split) + 1) * np.uint64(0xD1B54A32D192ED03)))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        return _splitmix64(key + idx * _GOLDEN)


def _uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """(N, count) float64 uniforms in [0, 1) from per-sample keys."""
    with np.errstate(over="ignore"):
        counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = _splitmix64(keys[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _pick(u: np.ndarray, n: int) -> np.ndarray:
    return np.minimum((u * n).astype(np.int64), n - 1)


# ----------------------------------------------------------------------------- scenes

_DRAWS_SCENE = 12
_DRAWS_OBJECT = 10
_NUM_DRAWS = _DRAWS_SCENE + 2 * _DRAWS_OBJECT


def _empty_scene(n: int) -> dict[str, np.ndarray]:
    return {
        "bg_rgb": np.zeros((n, 3)),
        "bg_style": np.zeros(n, dtype=np.int64),
        "bg_angle": np.zeros(n),
        "bg_delta": np.zeros(n),
        "bg_freq": np.zeros(n),
        "bg_phase": np.zeros(n),
        "present": np.zeros((n, 2), dtype=bool),
        "shape": np.zeros((n, 2), dtype=np.int64),
        "cx": np.full((n, 2), 0.5),
        "cy": np.full((n, 2), 0.5),
        "extent": np.full((n, 2), 0.3),
        "rgb": np.zeros((n, 2, 3)),
    }


def _fill_background(scene: dict, rows: np.ndarray, tone: np.ndarray, style: np.ndarray, u: np.ndarray) -> None:
    """u: (len(rows), 8) uniforms -> background level, tint, gradient/wave parameters."""
    lo = np.array([_BACKGROUND_LEVEL[BACKGROUNDS[t]][0] for t in tone])
    hi = np.array([_BACKGROUND_LEVEL[BACKGROUNDS[t]][1] for t in tone])
    level = lo + (hi - lo) * u[:, 0]
    tint = (u[:, 1:4] - 0.5) * 0.06  # faint tint: backgrounds stay neutral so colour words are unambiguous
    scene["bg_rgb"][rows] = np.clip(level[:, None] + tint, 0.0, 1.0)
    scene["bg_style"][rows] = style
    scene["bg_angle"][rows] = u[:, 4] * 2 * math.pi
    # gradient: +-0.12 change across the image; waves: amplitude 0.03-0.07 (stays inside its tone band)
    gradient_delta = (u[:, 5] - 0.5) * 0.24
    wave_amplitude = 0.03 + 0.04 * u[:, 5]
    scene["bg_delta"][rows] = np.where(style == 1, gradient_delta, np.where(style == 2, wave_amplitude, 0.0))
    scene["bg_freq"][rows] = 1.5 + 2.5 * u[:, 6]
    scene["bg_phase"][rows] = u[:, 7] * 2 * math.pi


def _fill_object(scene: dict, rows: np.ndarray, slot: int, obj: dict[str, np.ndarray], u: np.ndarray | None) -> None:
    """Geometry and colour of object `slot`; u: (len(rows), 6) jitter uniforms or None for none."""
    centre = np.array([_POSITION_XY[POSITIONS[p]] for p in obj["position"]]).reshape(-1, 2)
    extent = np.array([_SIZE_EXTENT[SIZES[s]] for s in obj["size"]])
    rgb = np.array([COLOUR_RGB[COLOURS[c]] for c in obj["colour"]], dtype=np.float64).reshape(-1, 3) / 255.0
    if u is not None:
        centre = centre + (u[:, 0:2] - 0.5) * 2 * _JITTER
        extent = extent * (0.94 + 0.12 * u[:, 2])
        rgb = np.clip(rgb + (u[:, 3:6] - 0.5) * 2 * _COLOUR_JITTER, 0.0, 1.0)
    scene["present"][rows, slot] = True
    scene["shape"][rows, slot] = obj["shape"]
    scene["cx"][rows, slot] = centre[:, 0]
    scene["cy"][rows, slot] = centre[:, 1]
    scene["extent"][rows, slot] = extent
    scene["rgb"][rows, slot] = rgb


def sample_scenes(keys: np.ndarray, two_object_prob: float = 0.3) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Draw scenes for per-sample keys: (render parameters for `render_scenes`, attribute dicts)."""
    n = len(keys)
    u = _uniforms(keys, _NUM_DRAWS)
    scene = _empty_scene(n)
    two = u[:, 0] < two_object_prob
    tone = _pick(u[:, 1], len(BACKGROUNDS))
    style = _pick(u[:, 2], len(BACKGROUND_STYLES))
    _fill_background(scene, np.arange(n), tone, style, u[:, 3:11])

    # Positions: any of the five for one object; an opposite pair (either order) for two.
    pos_single = _pick(u[:, 11], len(POSITIONS))
    pair_first = _pick(u[:, 11], 4)  # left, right, top, bottom
    positions = [np.where(two, pair_first, pos_single), pair_first ^ 1]  # index ^ 1 is the opposite
    objects: list[dict[str, np.ndarray]] = []
    for slot in range(2):
        base = _DRAWS_SCENE + slot * _DRAWS_OBJECT
        obj = {
            "shape": _pick(u[:, base], len(SHAPES)),
            "colour": _pick(u[:, base + 1], len(COLOURS)),
            "size": _pick(u[:, base + 2], len(SIZES)),
            "position": positions[slot],
        }
        rows = np.arange(n) if slot == 0 else np.flatnonzero(two)
        _fill_object(scene, rows, slot, {k: v[rows] for k, v in obj.items()}, u[rows, base + 3 : base + 9])
        objects.append(obj)

    attributes = []
    for i in range(n):
        objs = [
            {
                "shape": SHAPES[objects[s]["shape"][i]],
                "colour": COLOURS[objects[s]["colour"][i]],
                "size": SIZES[objects[s]["size"][i]],
                "position": POSITIONS[objects[s]["position"][i]],
            }
            for s in range(2 if two[i] else 1)
        ]
        attributes.append(
            {"objects": objs, "background": BACKGROUNDS[tone[i]], "background_style": BACKGROUND_STYLES[style[i]]}
        )
    return scene, attributes


# ----------------------------------------------------------------------------- rendering

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
    # one flat-colour composite per object slot (objects of a scene never overlap).
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


# ----------------------------------------------------------------------------- attributes and captions


def _canonical(value: Any, allowed: Sequence[str], field: str) -> str:
    word = _ALIASES.get(str(value).lower().strip(), str(value).lower().strip())
    if word not in allowed:
        raise ValueError(f"unknown {field} {value!r}; expected one of {tuple(allowed)}")
    return word


def normalize_attributes(attributes: dict) -> dict:
    """Validate an attribute dict and map synonyms (center, grey, big, color) to canonical names.

    Accepts the full format or a partial one (fields may be missing), including a single object
    given at top level: ``{"shape": "circle", "colour": "red"}``.
    """
    if "objects" not in attributes:
        attributes = {"objects": [{k: v for k, v in attributes.items() if not k.startswith("background")}],
                      **{k: v for k, v in attributes.items() if k.startswith("background")}}
    objects = attributes["objects"]
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"shapes scenes hold 1 or 2 objects, got {len(objects)}")
    fields = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
    out_objects = []
    for obj in objects:
        obj = {_ALIASES.get(k, k): v for k, v in obj.items()}
        unknown = set(obj) - set(fields)
        if unknown:
            raise ValueError(f"unknown object attribute(s) {sorted(unknown)}; expected {tuple(fields)}")
        out_objects.append({k: _canonical(obj[k], fields[k], k) for k in fields if obj.get(k) is not None})
    out: dict[str, Any] = {"objects": out_objects}
    if attributes.get("background") is not None:
        out["background"] = _canonical(attributes["background"], BACKGROUNDS, "background")
    if attributes.get("background_style") is not None:
        out["background_style"] = _canonical(attributes["background_style"], BACKGROUND_STYLES, "background_style")
    return out


def complete_attributes(attributes: dict, seed: int = 0) -> dict:
    """Fill the missing fields of (partial) attributes with seeded random choices the generator could make."""
    attrs = normalize_attributes(attributes)
    rng = random.Random(seed)
    objects = [dict(o) for o in attrs["objects"]]
    if len(objects) == 2:
        given = [o.get("position") for o in objects]
        if "centre" in given:
            raise ValueError("two-object scenes use opposite positions (left/right, top/bottom), not centre")
        if given[0] is None and given[1] is None:
            given[0] = rng.choice(tuple(_OPPOSITE))
        given = [p if p is not None else _OPPOSITE[given[1 - i]] for i, p in enumerate(given)]
        if given[0] == given[1]:
            raise ValueError(f"both objects are at {given[0]!r}; two objects need different positions")
        for obj, pos in zip(objects, given):
            obj["position"] = pos
    for obj in objects:
        obj.setdefault("shape", rng.choice(SHAPES))
        obj.setdefault("colour", rng.choice(COLOURS))
        obj.setdefault("size", rng.choice(SIZES))
        obj.setdefault("position", rng.choice(POSITIONS))
    return {
        "objects": [{k: o[k] for k in ("shape", "colour", "size", "position")} for o in objects],
        "background": attrs.get("background") or rng.choice(BACKGROUNDS),
        "background_style": attrs.get("background_style") or rng.choice(BACKGROUND_STYLES),
    }


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


def _choose(options: Sequence[str], rng: random.Random | None) -> str:
    return options[0] if rng is None else rng.choice(options)


def _phrases(obj: dict, rng: random.Random | None) -> dict[str, str]:
    position = obj.get("position")
    return {
        "S": _choose(_SIZE_WORDS[obj["size"]], rng) if obj.get("size") else "",
        "C": obj.get("colour", ""),
        "H": _choose(_SHAPE_WORDS[obj["shape"]], rng) if obj.get("shape") else "shape",
        "P": _choose(_POSITION_PHRASES[position], rng) if position else "",
        "p": _choose(_POSITION_SHORT[position], rng) if position else "",
    }


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"(,\s*)+,", ",", text)
    text = re.sub(r"^[\s,]+|[\s,]+$", "", text)
    text = re.sub(r"\ba(?= [aeiou])", "an", text)
    return text


def _object_phrase(obj: dict, rng: random.Random | None, template: int = 0) -> str:
    return _tidy(_SINGLE_TEMPLATES[template].format(**_phrases(obj, rng)))


def make_caption(attributes: dict, rng: random.Random | int | None = None) -> str:
    """Caption for (partial) attributes; `rng=None` gives the canonical form.

    ``{"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "left"}]}``
    -> "a small red circle on the left"; ``{"shape": "circle", "colour": "red"}`` -> "a red circle";
    two objects -> "a small red circle on the left and a large blue square on the right". With an rng
    (or int seed), one of several templates and synonyms is drawn ("red circle, left side, small",
    "a little red disk to the left of a big blue square", ...). Missing fields are left out.
    """
    if isinstance(rng, (int, np.integer)):
        rng = random.Random(int(rng))
    attrs = normalize_attributes(attributes)
    objects = attrs["objects"]
    if len(objects) == 1:
        template = 0 if rng is None else rng.randrange(len(_SINGLE_TEMPLATES))
        caption = _object_phrase(objects[0], rng, template)
    else:
        if rng is not None and rng.random() < 0.5:
            objects = objects[::-1]
        a, b = objects
        style = 0 if rng is None else rng.randrange(4)
        if style == 1 and a.get("position") in _RELATION and b.get("position") == _OPPOSITE[a["position"]]:
            no_pos = [{k: v for k, v in o.items() if k != "position"} for o in (a, b)]
            caption = f"{_object_phrase(no_pos[0], rng)} {_RELATION[a['position']]} {_object_phrase(no_pos[1], rng)}"
        elif style == 2:
            caption = "; ".join(_object_phrase(o, rng, 1) for o in (a, b))
        elif style == 3:
            caption = f"two shapes: {_object_phrase(a, rng)} and {_object_phrase(b, rng)}"
        else:
            caption = f"{_object_phrase(a, rng)} and {_object_phrase(b, rng)}"
    background = attrs.get("background")
    if background and rng is not None:
        word = rng.choice(_BACKGROUND_WORDS[background])
        caption += f", {word} background" if rng.random() < 0.5 else f" on a {word} background"
    return _tidy(caption)


def _caption_for_training(attributes: dict, rng: random.Random, omit_prob: float, background_prob: float) -> str:
    """Randomised caption: sometimes leaves out size / position (single object) or names the background."""
    objects = attributes["objects"]
    if len(objects) == 1:
        obj = dict(objects[0])
        if rng.random() < omit_prob:
            del obj["size"]
        if rng.random() < omit_prob:
            del obj["position"]
        objects = [obj]
    shown = {"objects": objects}
    if rng.random() < background_prob:
        shown["background"] = attributes["background"]
    return make_caption(shown, rng)


def mirror_sample(sample: dict) -> dict:
    """Flip a sample left-right, swapping left/right in its caption and attributes so they stay true."""
    swap = {"left": "right", "right": "left"}
    attrs = dict(sample["attributes"])
    attrs["objects"] = [{**o, "position": swap.get(o["position"], o["position"])} for o in attrs["objects"]]
    caption = re.sub(r"\b(left|right)\b", lambda m: swap[m.group(1)], sample["caption"])
    return {**sample, "image": sample["image"].flip(-1), "caption": caption, "attributes": attrs}


# ----------------------------------------------------------------------------- dataset + datamodule


class ShapesDataset(Dataset):
    """Map-style view of the generator: `size` virtual samples of one split, rendered on demand."""

    def __init__(
        self,
        split: str = "train",
        size: int = 50_000,
        resolution: int = 32,
        seed: int = 0,
        two_object_prob: float = 0.3,
        omit_prob: float = 0.15,
        background_prob: float = 0.25,
        supersample: int | None = None,
        hflip: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 1:
            raise ValueError(f"shapes: {split} size must be >= 1, got {size}")
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"shapes: two_object_prob must be in [0, 1], got {two_object_prob}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.resolution = validate_resolution(resolution, MIN_RESOLUTION, "shapes")
        self.two_object_prob, self.omit_prob, self.background_prob = two_object_prob, omit_prob, background_prob
        self.supersample = supersample
        self.hflip = hflip

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> dict:
        """Attributes of sample `index` without rendering it."""
        return sample_scenes(sample_keys(self.seed, self.split, [index]), self.two_object_prob)[1][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Render a whole batch at once (DataLoader calls this with the batch's indices)."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not -self.size <= i < self.size:
                raise IndexError(f"index {i} out of range for shapes {self.split} split of size {self.size}")
        indices = [i % self.size for i in indices]
        keys = sample_keys(self.seed, self.split, indices)
        scene, attributes = sample_scenes(keys, self.two_object_prob)
        images = render_scenes(scene, self.resolution, self.supersample)
        samples = []
        for image, attrs, key in zip(images, attributes, keys.tolist()):
            rng = random.Random(key)  # caption wording: also a pure function of (seed, split, index)
            caption = _caption_for_training(attrs, rng, self.omit_prob, self.background_prob)
            sample = {"image": image, "caption": caption, "attributes": attrs}
            if self.hflip and torch.rand(()) < 0.5:
                sample = mirror_sample(sample)
            samples.append(sample)
        return samples


class ShapesDataModule(ImageTextDataModule):
    """Embedded captioned-shapes data: nothing to download, generated on the fly.

    `hflip` (train only, off by default) mirrors the image *and* swaps left/right in the caption
    and attributes, since captions name positions.
    """

    name = "shapes"
    min_resolution = MIN_RESOLUTION

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        train_size: int = 50_000,
        val_size: int = 1000,
        test_size: int = 1000,
        two_object_prob: float = 0.3,
        omit_prob: float = 0.15,
        background_prob: float = 0.25,
        supersample: int | None = None,
        **loader_options: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, resolution, seed, **loader_options)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        for split, n in self.sizes.items():
            if n < 1:
                raise ValueError(f"shapes: {split}_size must be >= 1, got {n}")
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"shapes: two_object_prob must be in [0, 1], got {two_object_prob}")
        self.two_object_prob, self.omit_prob, self.background_prob = two_object_prob, omit_prob, background_prob
        self.supersample = supersample

    def make_dataset(self, split: str, augment: bool = False) -> ShapesDataset:
        return ShapesDataset(
            split, self.sizes[split], self.resolution, self.seed, self.two_object_prob,
            self.omit_prob, self.background_prob, self.supersample, hflip=augment,
        )

    # --- hooks read by evaluation code, so that it needs no knowledge of this dataset

    @staticmethod
    def zero_shot_task(template: str = "a {colour} {shape}") -> Any:
        """CLIP validation's zero-shot classification: colour x shape prompts, scored on single-object images."""
        from ldmkit.nn.clip import ZeroShotTask

        def target(attributes: dict) -> dict | None:
            objects = attributes.get("objects") or []
            return {"colour": objects[0]["colour"], "shape": objects[0]["shape"]} if len(objects) == 1 else None

        return ZeroShotTask("shapes", template, {"colour": list(COLOURS), "shape": list(SHAPES)}, target)

    @staticmethod
    def attribute_task() -> dict[str, Any]:
        """What an attribute judge (ldmkit.eval.attributes) learns and reads back on this data: its fields and
        their values, a single-object training set, and which held-out prompts it can judge (one object)."""

        def training_set(resolution: int, size: int, seed: int) -> ShapesDataset:
            return ShapesDataset("train", size=size, resolution=resolution, seed=seed, two_object_prob=0.0)

        return {
            "name": "shapes",
            "fields": {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS},
            "judged_fields": ("colour", "shape"),
            "judges": lambda attributes: bool(attributes) and len(attributes.get("objects", [])) == 1,
            "judged_prompts": "single-object",
            "unjudged_prompts": "two-object prompts are not judged",
            "training_set": training_set,
        }
