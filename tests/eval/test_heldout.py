"""The quickstart's prompt-following measurement: held-out prompts and the accuracy it reports."""

from __future__ import annotations

import torch

from ldmkit.data.shapes import COLOURS, SHAPES, ShapesDataset
from ldmkit.eval.heldout import HELDOUT_TEMPLATE, accuracy_by_shape, colour_shape_accuracy, heldout_prompts


def test_heldout_prompts_cover_every_pair_with_an_unseen_phrasing():
    prompts = heldout_prompts()
    pairs = {(a["objects"][0]["colour"], a["objects"][0]["shape"]) for _, a in prompts}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} and len(prompts) == len(pairs)
    # the phrasing never occurs in training captions (nor does its distinctive prefix)
    prefix = HELDOUT_TEMPLATE.split("{")[0].strip()
    captions = [r["caption"] for r in ShapesDataset("train", size=3000, resolution=16, seed=0).__getitems__(range(3000))]
    assert not any(prefix in c for c in captions)
    assert not set(p for p, _ in prompts) & set(captions)


class FixedJudge:
    """Answers colour index 0 and each image's shape from its first pixel, to check the bookkeeping."""

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = images.shape[0]
        colour = torch.zeros(n, len(COLOURS))
        colour[:, 0] = 1
        shape = torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), len(SHAPES)).float()
        return {"colour": colour, "shape": shape}


def test_colour_shape_accuracy_counts_joint_hits():
    targets = [{"objects": [{"colour": c, "shape": s}]} for c, s in [("red", "circle"), ("red", "square"), ("green", "circle"), ("blue", "star")]]
    images = torch.zeros(4, 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor([SHAPES.index("circle"), SHAPES.index("circle"), SHAPES.index("circle"), SHAPES.index("star")])
    acc = colour_shape_accuracy(FixedJudge(), images, targets)
    # colour right for the two red ones; shape right for 0, 2, 3; both right only for 0
    assert acc == {"colour": 0.5, "shape": 0.75, "colour+shape": 0.25}


def test_accuracy_by_shape_splits_the_joint_hits_by_the_asked_for_shape():
    targets = [{"objects": [{"colour": c, "shape": s}]} for c, s in [("red", "circle"), ("red", "star"), ("red", "star"), ("green", "circle")]]
    images = torch.zeros(4, 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor([SHAPES.index("circle"), SHAPES.index("star"), SHAPES.index("circle"), SHAPES.index("circle")])
    # circle: image 0 right, image 3 wrong colour; star: image 1 right, image 2 drawn as a circle
    assert accuracy_by_shape(FixedJudge(), images, targets) == {"circle": 0.5, "star": 0.5}
