"""A compositional prompt suite on `shapes`, after GenEval (Ghosh et al. 2023) and T2I-CompBench (Huang et
al. 2023): prompts in four categories, each with the attributes an object judge must read back.

- counting: "an image showing two red circles" / "... one red circle": exactly that many objects, of that shape;
- binding: "an image showing a red circle and a blue square": both objects, each with its own colour (a
  swapped pair, blue circle and red square, is wrong);
- position: "an image showing a red circle on the left" (left / right / top / bottom / centre): one object,
  that shape, there;
- size: "an image showing a small red circle" (small / large): one object, that shape, that size.

Every prompt starts with `SUITE_FRAME`, which no training caption uses (the training templates are in
`ldmkit.data.shapes.captions`; tests/data/test_shapes_suite.py checks both ways), so the suite asks for
known words in a phrasing the model never saw. `CHECKED` names the fields a category compares: the found
objects, as a multiset of those fields, must equal the prompt's (`ldmkit.eval.compositional`).
"""

from __future__ import annotations

import random
from typing import Any

from ldmkit.data.shapes.captions import _PLURAL_WORDS, _POSITION_PHRASES, _tidy
from ldmkit.data.shapes.scenes import COLOURS, POSITIONS, SHAPES, SIZES

SUITE_FRAME = "an image showing"
CATEGORIES = ("counting", "binding", "position", "size")
CHECKED: dict[str, tuple[str, ...]] = {
    "counting": ("shape",),
    "binding": ("colour", "shape"),
    "position": ("shape", "position"),
    "size": ("shape", "size"),
}


def _object(colour: str, shape: str, **more: str) -> dict[str, str]:
    return {"colour": colour, "shape": shape, **more}


def _item(category: str, rng: random.Random, j: int) -> tuple[str, dict[str, Any]]:
    """The j-th prompt of a category: its variants (counts, positions, sizes) cycle, colour and shape are drawn."""
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    if category == "counting":
        count = 1 + j % 2
        words = f"one {colour} {shape}" if count == 1 else f"two {colour} {_PLURAL_WORDS[shape][0]}"
        objects = [_object(colour, shape)] * count
    elif category == "binding":
        colour_b = rng.choice([c for c in COLOURS if c != colour])
        shape_b = rng.choice([s for s in SHAPES if s != shape])
        words = f"a {colour} {shape} and a {colour_b} {shape_b}"
        objects = [_object(colour, shape), _object(colour_b, shape_b)]
    elif category == "position":
        position = POSITIONS[j % len(POSITIONS)]
        words = f"a {colour} {shape} {_POSITION_PHRASES[position][0]}"
        objects = [_object(colour, shape, position=position)]
    elif category == "size":
        size = SIZES[j % len(SIZES)]
        words = f"a {size} {colour} {shape}"
        objects = [_object(colour, shape, size=size)]
    else:
        raise ValueError(f"unknown suite category {category!r}; expected one of {CATEGORIES}")
    return _tidy(f"{SUITE_FRAME} {words}"), {"category": category, "objects": [dict(o) for o in objects]}


def suite_prompts(per_category: int = 64, seed: int = 0,
                  categories: tuple[str, ...] = CATEGORIES) -> list[tuple[str, dict[str, Any]]]:
    """`per_category` (prompt, target) pairs per category, category by category; a pure function of the seed.

    A target is ``{"category": ..., "objects": [{"colour", "shape", and "position" or "size"}, ...]}``.
    """
    if per_category < 1:
        raise ValueError(f"the compositional suite needs per_category >= 1, got {per_category}")
    items = []
    for category in categories:
        rng = random.Random(f"shapes-suite-{seed}-{category}")  # str seeds hash with SHA-512: stable across runs
        items += [_item(category, rng, j) for j in range(per_category)]
    return items


def scene_for(target: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Attributes to render a real image that follows the target (`render_attributes` completes the rest);
    the two objects of a counting scene share their size, as the generator's counting scenes do."""
    objects = [dict(o) for o in target["objects"]]
    if target["category"] == "counting" and len(objects) == 2:
        size = rng.choice(SIZES)
        for obj in objects:
            obj["size"] = size
    return {"objects": objects}


def counterpart(target: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Attributes of a real image that does *not* follow the target, differing only in what the category
    checks: the other count, the swapped colours, another position, the other size."""
    category, objects = target["category"], [dict(o) for o in target["objects"]]
    if category == "counting":
        objects = [objects[0], dict(objects[0])] if len(objects) == 1 else objects[:1]
        return scene_for({"category": category, "objects": objects}, rng)
    if category == "binding":
        a, b = objects
        a["colour"], b["colour"] = b["colour"], a["colour"]
    elif category == "position":
        objects[0]["position"] = rng.choice([p for p in POSITIONS if p != objects[0]["position"]])
    elif category == "size":
        objects[0]["size"] = next(s for s in SIZES if s != objects[0]["size"])
    return {"objects": objects}

