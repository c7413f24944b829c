"""Captions of `shapes` scenes: templates and synonyms (the canonical form with `rng=None`), the
randomised training captions, and the left/right mirror that keeps a caption true."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np

from ldmkit.data.shapes.scenes import _OPPOSITE, normalize_attributes

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
# Two identical objects (counting scenes): plural shape words, and where the pair sits.
_PLURAL_WORDS = {
    "circle": ("circles", "disks"),
    "square": ("squares", "square shapes"),
    "triangle": ("triangles", "triangle shapes"),
    "diamond": ("diamonds", "rhombuses"),
    "star": ("stars", "five-pointed stars"),
    "cross": ("crosses", "plus signs"),
}
_PAIR_PHRASES = {
    "left": ("on the left and on the right", "side by side", "left and right"),
    "top": ("at the top and at the bottom", "one above the other", "top and bottom"),
}
# {N} "two"/"a pair of", {S} size, {C} colour, {Hs} plural shape, {PP} where the pair sits.
_PAIR_TEMPLATES = ("{N} {S} {C} {Hs} {PP}", "{N} {S} {C} {Hs}", "{PP}, {N} {S} {C} {Hs}", "{S} {C} {Hs}, two of them")
_BACKGROUND_WORDS = {"dark": ("dark", "black"), "gray": ("gray", "grey"), "light": ("light", "white")}

# One template per line; {S} size, {C} colour, {H} shape, {P} position phrase, {p} short position.
# The article "an" must occur on its own: open_clip's BPE splits "cyan" into "cy" + "an</w>", the same token as the
# word "an", so captions without it taught a CLIP that "an" means cyan, and prompts that begin "an ..." came out
# cyan-tinted (BENCHMARKS.md, "The word 'an' and cyan").
_SINGLE_TEMPLATES = (
    "a {S} {C} {H} {P}",
    "{C} {H}, {p}, {S}",
    "{P}, a {S} {C} {H}",
    "there is a {S} {C} {H} {P}",
    "a picture of a {S} {C} {H} {P}",
    "a {S} {H} in {C} {P}",
    "{S} {C} {H} {P}",
    "an illustration of a {S} {C} {H} {P}",
)


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
        if rng is not None and _identical(a, b) and rng.random() < 0.5:  # the rng draw only for identical pairs
            caption = _pair_phrase(a, b, rng)
        elif style == 1 and a.get("position") in _RELATION and b.get("position") == _OPPOSITE[a["position"]]:
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


def _identical(a: dict, b: dict) -> bool:
    """Two objects that differ at most in position (a counting scene), shape and colour named."""
    return bool(a.get("shape") and a.get("colour")) and all(a.get(k) == b.get(k) for k in ("shape", "colour", "size"))


def _pair_phrase(a: dict, b: dict, rng: random.Random) -> str:
    """"two small red circles side by side", "a pair of red circles", ... for two identical objects."""
    positions = {a.get("position"), b.get("position")}
    axis = next((p for p in ("left", "top") if positions == {p, _OPPOSITE[p]}), None)
    words = {
        "N": rng.choice(("two", "two", "a pair of")),
        "S": rng.choice(_SIZE_WORDS[a["size"]]) if a.get("size") else "",
        "C": a["colour"],
        "Hs": rng.choice(_PLURAL_WORDS[a["shape"]]),
        "PP": rng.choice(_PAIR_PHRASES[axis]) if axis else "",
    }
    return _tidy(rng.choice(_PAIR_TEMPLATES).format(**words))


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
