"""Scoring the compositional prompt suite (`ldmkit.data.shapes.suite`): a verdict per sample from the object
judge's reading (`ldmkit.eval.objects`), and the judge's own accuracy on real rendered images, for and against
every prompt (the rates' Wilson intervals: `ldmkit.eval.intervals`).

A sample is correct when the objects found, as a multiset of the fields its category checks, equal the
prompt's: counting compares shapes (so "two red circles" needs exactly two circles), binding (colour,
shape) pairs (a red circle and a blue square, not a blue circle and a red square: that is "swapped"),
position (shape, position), size (shape, size). An extra or a missing object is always wrong.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

CORRECT, SWAPPED, WRONG = "correct", "swapped", "wrong"


def _multiset(objects: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> Counter:
    return Counter(tuple(obj.get(f) for f in fields) for obj in objects)


def verdict(target: Mapping[str, Any], found: Sequence[Mapping[str, Any]], checked: Mapping[str, Sequence[str]]) -> str:
    """correct / swapped (binding: both objects there with each other's colours) / wrong."""
    fields = checked[target["category"]]
    wanted = target["objects"]
    if _multiset(found, fields) == _multiset(wanted, fields):
        return CORRECT
    if target["category"] == "binding" and len(wanted) == 2:
        a, b = wanted
        crossed = [{**a, "colour": b["colour"]}, {**b, "colour": a["colour"]}]
        if _multiset(found, fields) == _multiset(crossed, fields):
            return SWAPPED
    return WRONG


def real_images_for(suite: Mapping[str, Any], targets: Sequence[Mapping[str, Any]], resolution: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real rendered images (jittered, random backgrounds) that follow each target, and that do not (the
    counterpart differs only in what the category checks): two (N, 3, R, R) tensors in [-1, 1]."""
    rng = random.Random(f"suite-real-{seed}")
    follow = [suite["scene_for"](t, rng) for t in targets]
    against = [suite["counterpart"](t, rng) for t in targets]
    render = suite["render"]
    return render(follow, resolution, seed=seed), render(against, resolution, seed=seed + len(targets))


def judge_accuracy_on_real(read: Callable[[torch.Tensor], list[list[dict]]], suite: Mapping[str, Any],
                           targets: Sequence[Mapping[str, Any]], resolution: int, seed: int = 0,
                           batch_size: int = 256) -> dict[str, dict[str, int]]:
    """Per category: how often the judge accepts a real image that follows its prompt (`accepted` of
    `followed`) and rejects one that does not (`rejected` of `violated`)."""
    follow, against = real_images_for(suite, targets, resolution, seed)
    out = {c: {"accepted": 0, "followed": 0, "rejected": 0, "violated": 0} for c in suite["categories"]}
    for images, positive in ((follow, True), (against, False)):
        found = [objs for start in range(0, len(targets), batch_size)
                 for objs in read(images[start : start + batch_size])]
        for target, objects in zip(targets, found):
            counts, ok = out[target["category"]], verdict(target, objects, suite["checked"]) == CORRECT
            if positive:
                counts["followed"] += 1
                counts["accepted"] += ok
            else:
                counts["violated"] += 1
                counts["rejected"] += not ok
    return out


def judge_accuracy(counts: Mapping[str, int]) -> float:
    """Accuracy over the images for and against the prompts together."""
    total = counts["followed"] + counts["violated"]
    return (counts["accepted"] + counts["rejected"]) / total if total else float("nan")
