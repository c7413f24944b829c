"""The compositional suite's prompts (ldmkit.data.shapes.suite) and the counting scenes/captions training needs."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from ldmkit.data.shapes import (
    COLOURS, POSITIONS, SHAPES, SIZES, ShapesDataModule, ShapesDataset, make_caption, sample_keys, sample_scenes,
)
from ldmkit.data.shapes import captions as caption_module
from ldmkit.data.shapes.captions import _caption_for_training
from ldmkit.data.shapes.suite import CATEGORIES, CHECKED, SUITE_FRAME, counterpart, scene_for, suite_prompts


def test_suite_is_balanced_deterministic_and_well_formed():
    items = suite_prompts(per_category=10, seed=3)
    assert items == suite_prompts(per_category=10, seed=3) and items != suite_prompts(per_category=10, seed=4)
    assert Counter(t["category"] for _, t in items) == {c: 10 for c in CATEGORIES}
    by = {c: [t for _, t in items if t["category"] == c] for c in CATEGORIES}
    assert [len(t["objects"]) for t in by["counting"]] == [1, 2] * 5
    assert all(t["objects"][0] == t["objects"][-1] for t in by["counting"])  # "two red circles": identical objects
    for t in by["binding"]:
        a, b = t["objects"]
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]  # a swap is always a different scene
    assert [t["objects"][0]["position"] for t in by["position"]] == list(POSITIONS) * 2
    assert [t["objects"][0]["size"] for t in by["size"]] == list(SIZES) * 5
    for prompt, target in items:
        assert prompt.startswith(SUITE_FRAME + " ")
        for obj in target["objects"]:  # every checked field is named by the prompt, in its words
            assert set(CHECKED[target["category"]]) <= set(obj) and obj["colour"] in prompt
    assert items[1][0] == "an image showing two " + by["counting"][1]["objects"][0]["colour"] + " " + \
        caption_module._PLURAL_WORDS[by["counting"][1]["objects"][0]["shape"]][0]
    with pytest.raises(ValueError, match="per_category >= 1"):
        suite_prompts(0)


def _training_strings() -> list[str]:
    """Every literal string the training-caption generator builds captions from."""
    tables = [caption_module._SINGLE_TEMPLATES, caption_module._PAIR_TEMPLATES, *caption_module._SHAPE_WORDS.values(),
              *caption_module._SIZE_WORDS.values(), *caption_module._POSITION_PHRASES.values(),
              *caption_module._POSITION_SHORT.values(), *caption_module._PLURAL_WORDS.values(),
              *caption_module._PAIR_PHRASES.values(), *caption_module._BACKGROUND_WORDS.values(),
              tuple(caption_module._RELATION.values())]
    return [s for table in tables for s in table]


def test_no_training_caption_uses_the_suite_frame():
    frame_words = set(SUITE_FRAME.split()) - {"an", "a"}
    assert not any(word in re.findall(r"\w+", s) for s in _training_strings() for word in frame_words)
    # and, drawn as ShapesDataset draws them: every template and counting phrasing (two-object and counting
    # scenes made common; nothing is rendered)
    keys = sample_keys(0, "train", np.arange(4000))
    _, scenes = sample_scenes(keys, two_object_prob=0.6, same_pair_prob=0.5)
    captions = [_caption_for_training(a, random.Random(k), 0.15, 0.5) for a, k in zip(scenes, keys.tolist())]
    assert any(c.startswith(("two ", "a pair of ")) for c in captions)  # counting captions are among them
    assert not any(SUITE_FRAME in c for c in captions)
    assert not {p for p, _ in suite_prompts(64)} & set(captions)


def test_counterparts_differ_only_in_what_the_category_checks():
    rng = random.Random(0)
    for _, target in suite_prompts(per_category=10, seed=1):
        follows, violates = scene_for(target, rng), counterpart(target, rng)
        category, objects = target["category"], target["objects"]
        if category == "counting":
            assert len(violates["objects"]) == 3 - len(objects)
            kinds = {(o["shape"], o["colour"]) for o in objects}
            assert {(o["shape"], o["colour"]) for o in violates["objects"]} == kinds
            assert len({o.get("size") for o in follows["objects"]}) == 1  # a counting pair shares its size
        elif category == "binding":
            (a, b), (x, y) = objects, violates["objects"]
            assert (x["shape"], x["colour"]) == (a["shape"], b["colour"])
            assert (y["shape"], y["colour"]) == (b["shape"], a["colour"])
        else:
            field = CHECKED[category][1]
            assert violates["objects"][0][field] != objects[0][field]
            assert {k: v for k, v in violates["objects"][0].items() if k != field} == \
                {k: v for k, v in objects[0].items() if k != field}


def test_counting_scenes_repeat_the_first_object_and_leave_other_scenes_alone():
    keys = range(3000)
    before = sample_scenes(sample_keys(5, "train", keys), 0.3, same_pair_prob=0.0)[1]
    after = sample_scenes(sample_keys(5, "train", keys), 0.3, same_pair_prob=0.5)[1]
    assert ShapesDataset("train", size=3000, seed=5, same_pair_prob=0.5).attributes(7) == after[7]  # the data's draw
    changed = [i for i in keys if before[i] != after[i]]
    assert all(len(after[i]["objects"]) == 2 for i in changed)  # only two-object scenes can change
    same = [i for i in keys if len(after[i]["objects"]) == 2 and after[i]["objects"][0] | {"position": ""}
            == after[i]["objects"][1] | {"position": ""}]
    two = sum(len(a["objects"]) == 2 for a in after)
    assert 0.4 < len(same) / two < 0.6  # ~half of the pairs, plus the 1/72 that match by chance
    for i in same:
        a, b = after[i]["objects"]
        assert {a["position"], b["position"]} in ({"left", "right"}, {"top", "bottom"})
    assert all(before[i]["objects"][0] == after[i]["objects"][0] for i in changed)  # the first object is kept
    with pytest.raises(ValueError, match="same_pair_prob must be in"):
        ShapesDataset("train", size=10, same_pair_prob=1.5)


def test_counting_captions_name_the_count_in_plural():
    pair = {"objects": [{"shape": "cross", "colour": "blue", "size": "large", "position": "top"},
                        {"shape": "cross", "colour": "blue", "size": "large", "position": "bottom"}]}
    captions = {make_caption(pair, seed) for seed in range(60)}
    plural = [c for c in captions if "crosses" in c or "plus signs" in c]
    assert plural and all("blue" in c for c in plural)
    assert any(c.startswith(("two ", "a pair of ")) for c in plural)
    assert any("above the other" in c or "top and bottom" in c or "at the top and at the bottom" in c for c in plural)
    assert not any("left" in c or "right" in c for c in plural)  # a vertical pair is never called left/right
    # the canonical caption of a pair stays the two-object one
    assert make_caption(pair) == "a large blue cross at the top and a large blue cross at the bottom"
    # pairs that differ in size are never called "two ..."
    mixed = {"objects": [dict(pair["objects"][0], size="small"), pair["objects"][1]]}
    assert not any("crosses" in make_caption(mixed, seed) for seed in range(60))


def test_suite_hook_and_datamodule_option():
    suite = ShapesDataModule.compositional_suite()
    assert suite["categories"] == CATEGORIES and suite["prompts"] is suite_prompts
    task = ShapesDataModule.attribute_task()
    assert set(task["palette"]) == set(COLOURS) and set(task["anchors"]) == set(POSITIONS)
    dm = ShapesDataModule(batch_size=4, num_workers=0, same_pair_prob=1.0, two_object_prob=1.0)
    attrs = dm.make_dataset("train").attributes(0)
    assert attrs["objects"][0]["shape"] == attrs["objects"][1]["shape"] in SHAPES
    assert ShapesDataset("val", size=2).same_pair_prob == 0.0  # the default, as in conf/data/shapes.yaml: the data as before
