"""What a `shapes` scene is: the attribute vocabulary, the counter-based draws that make every sample a
pure function of ``(seed, split, index)``, scene sampling, and attribute validation/completion."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from ldmkit.data.base import SPLITS

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
_ALIASES = {"center": "centre", "grey": "gray", "big": "large", "little": "small", "color": "colour"}


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


def sample_scenes(keys: np.ndarray, two_object_prob: float = 0.3,
                  same_pair_prob: float = 0.0) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Draw scenes for per-sample keys: (render parameters for `render_scenes`, attribute dicts).

    `same_pair_prob` of the two-object scenes repeat the first object's shape, colour and size (counting
    scenes: "two small red circles"); the draw deciding it is otherwise unused, so other scenes are unchanged.
    """
    n = len(keys)
    u = _uniforms(keys, _NUM_DRAWS)
    scene = _empty_scene(n)
    two = u[:, 0] < two_object_prob
    same = two & (u[:, _DRAWS_SCENE + _DRAWS_OBJECT - 1] < same_pair_prob)
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
        if slot == 1:  # counting scenes: the second object is a copy of the first, at the opposite position
            obj.update({k: np.where(same, objects[0][k], obj[k]) for k in ("shape", "colour", "size")})
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


# ----------------------------------------------------------------------------- attributes


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
