from __future__ import annotations

import hashlib
import itertools
import random
import time

import numpy as np
import pytest
import torch

from ldmkit.data.shapes import (
    BACKGROUND_STYLES,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataModule,
    ShapesDataset,
    complete_attributes,
    make_caption,
    mirror_sample,
    normalize_attributes,
    render_attributes,
    sample_keys,
)


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(((image + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()).hexdigest()


def _object_mask(image: torch.Tensor, colour: str, tol: float = 60.0) -> torch.Tensor:
    """Pixels within `tol` (0..255 RGB distance) of the palette colour: (H, W) bool."""
    rgb = torch.tensor(COLOUR_RGB[colour], dtype=torch.float32).view(3, 1, 1)
    return ((image + 1) * 127.5 - rgb).norm(dim=0) < tol


def test_constants_cover_the_spec():
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6 and len(SIZES) >= 2 and len(POSITIONS) >= 5
    assert set(COLOUR_RGB) == set(COLOURS)
    # colours must stay distinguishable at 32 px: far apart in RGB
    rgb = {c: np.array(v, dtype=float) for c, v in COLOUR_RGB.items()}
    closest = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(COLOURS, 2))
    assert closest > 100


def test_samples_are_a_pure_function_of_seed_split_index():
    ds = ShapesDataset("train", 1000, 32, seed=7)
    batch = ds.__getitems__([3, 11, 500])
    again = ShapesDataset("train", 1000, 32, seed=7)[11]
    assert torch.equal(batch[1]["image"], again["image"])
    assert batch[1]["caption"] == again["caption"] and batch[1]["attributes"] == again["attributes"]
    assert ds.attributes(500) == batch[2]["attributes"]
    other_seed = ShapesDataset("train", 1000, 32, seed=8)[11]
    assert not torch.equal(other_seed["image"], again["image"])


def test_splits_never_overlap():
    keys = {s: set(sample_keys(0, s, np.arange(20_000)).tolist()) for s in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    train = {_digest(s["image"]) for s in ShapesDataset("train", 2000, 16, seed=0, supersample=1).__getitems__(range(2000))}
    val = [_digest(s["image"]) for s in ShapesDataset("val", 300, 16, seed=0, supersample=1).__getitems__(range(300))]
    assert len(train) == 2000  # no duplicate images within a split either
    assert not train.intersection(val)


def test_scene_distribution():
    samples = ShapesDataset("train", 3000, 16, seed=1, supersample=1).__getitems__(range(3000))
    attrs = [s["attributes"] for s in samples]
    single = np.mean([len(a["objects"]) == 1 for a in attrs])
    assert 0.65 < single < 0.75
    objects = [o for a in attrs for o in a["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {o["position"] for o in objects} == set(POSITIONS)
    assert {a["background"] for a in attrs} == set(BACKGROUNDS)
    assert {a["background_style"] for a in attrs} == set(BACKGROUND_STYLES)
    for a in attrs:
        if len(a["objects"]) == 2:
            pair = {o["position"] for o in a["objects"]}
            assert pair in ({"left", "right"}, {"top", "bottom"})


@pytest.mark.parametrize("colour", COLOURS)
def test_object_colour_is_its_palette_colour_on_every_background(colour):
    for shape, background in itertools.product(SHAPES, BACKGROUNDS):
        image = render_attributes(
            {"objects": [{"shape": shape, "colour": colour, "size": "large", "position": "centre"}],
             "background": background, "background_style": "plain"}, 32, jitter=False,
        )[0]
        centre = (image[:, 16, 16] + 1) * 127.5
        nearest = min(COLOURS, key=lambda c: (centre - torch.tensor(COLOUR_RGB[c], dtype=torch.float32)).norm())
        assert nearest == colour, (shape, background)


def test_positions_and_sizes_are_where_the_caption_says():
    expected = {"left": lambda x, y: x < 12, "right": lambda x, y: x > 20, "top": lambda x, y: y < 12,
                "bottom": lambda x, y: y > 20, "centre": lambda x, y: 12 < x < 20 and 12 < y < 20}
    for position, shape in itertools.product(POSITIONS, SHAPES):
        areas = {}
        for size in SIZES:
            attrs = {"objects": [{"shape": shape, "colour": "red", "size": size, "position": position}],
                     "background": "gray", "background_style": "plain"}
            mask = _object_mask(render_attributes(attrs, 32, jitter=False)[0], "red")
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert expected[position](xs.float().mean(), ys.float().mean()), (shape, position, size)
            areas[size] = int(mask.sum())
        assert areas["large"] > 1.8 * areas["small"] > 0


def test_shapes_are_distinct_at_32px():
    for size in SIZES:
        images = {
            shape: render_attributes({"shape": shape, "colour": "blue", "size": size, "position": "centre",
                                      "background": "light", "background_style": "plain"}, 32, jitter=False)[0]
            for shape in SHAPES
        }
        background = images["circle"][:, 0, 0]
        contrast = (background - (torch.tensor(COLOUR_RGB["blue"]) / 127.5 - 1)).norm()
        for a, b in itertools.combinations(SHAPES, 2):
            differing_pixels = (images[a] - images[b]).norm(dim=0).sum() / contrast  # in fully-changed pixels
            assert differing_pixels > (12 if size == "small" else 25), (size, a, b, float(differing_pixels))


def test_two_object_scene_renders_both_objects():
    attrs = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "left"},
                         {"shape": "square", "colour": "blue", "size": "small", "position": "right"}]}
    image = render_attributes(attrs, 64)[0]
    red, blue = _object_mask(image, "red"), _object_mask(image, "blue")
    assert red[:, :28].sum() > 200 and red[:, 36:].sum() == 0
    assert blue[:, 36:].sum() > 50 and blue[:, :28].sum() == 0


def test_make_caption_canonical_and_partial():
    small_red_left = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "left"}]}
    assert make_caption(small_red_left) == "a small red circle on the left"
    assert make_caption({"shape": "circle", "colour": "red"}) == "a red circle"
    assert make_caption({"shape": "square", "colour": "blue", "size": "large", "position": "top"}) == \
        "a large blue square at the top"
    two = {"objects": [small_red_left["objects"][0],
                       {"shape": "square", "colour": "blue", "size": "large", "position": "right"}]}
    assert make_caption(two) == "a small red circle on the left and a large blue square on the right"
    variants = {make_caption(small_red_left, random.Random(i)) for i in range(400)}
    assert "red circle, left side, small" in variants
    assert len(variants) > 20
    for text in variants:
        assert "red" in text and any(w in text for w in ("circle", "disk")) and "  " not in text
        assert not text.startswith(",") and not text.endswith(",")


def test_training_captions_always_name_every_objects_colour_and_shape():
    synonyms = {"circle": ("circle", "disk"), "square": ("square",), "triangle": ("triangle",),
                "diamond": ("diamond", "rhombus"), "star": ("star",), "cross": ("cross", "plus")}
    samples = ShapesDataset("val", 600, 16, seed=3, supersample=1).__getitems__(range(600))
    partial = 0
    for s in samples:
        for obj in s["attributes"]["objects"]:
            assert obj["colour"] in s["caption"], s
            assert any(w in s["caption"] for w in synonyms[obj["shape"]]), s
        partial += len(s["attributes"]["objects"]) == 1 and not any(
            w in s["caption"] for w in ("left", "right", "top", "bottom", "upper", "lower", "centre", "center", "middle"))
    assert partial > 20  # "a red circle"-style prompts are in distribution


def test_normalize_and_complete_attributes():
    attrs = normalize_attributes({"objects": [{"shape": "Circle", "color": "red", "size": "big", "position": "center"}],
                                  "background": "grey"})
    assert attrs == {"objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "centre"}],
                     "background": "gray"}
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        normalize_attributes({"shape": "hexagon"})
    full = complete_attributes({"objects": [{"colour": "red", "position": "left"}, {"shape": "star"}]}, seed=1)
    assert full["objects"][0]["position"] == "left" and full["objects"][1]["position"] == "right"
    assert all(set(o) == {"shape", "colour", "size", "position"} for o in full["objects"])
    assert full["background"] in BACKGROUNDS and full["background_style"] in BACKGROUND_STYLES
    with pytest.raises(ValueError, match="different positions"):
        complete_attributes({"objects": [{"position": "left"}, {"position": "left"}]})


def test_mirror_sample_keeps_caption_true():
    attrs = {"objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "left"}],
             "background": "dark", "background_style": "plain"}
    sample = {"image": render_attributes(attrs, 32, jitter=False)[0], "caption": "a red circle to the left",
              "attributes": attrs}
    mirrored = mirror_sample(sample)
    assert mirrored["caption"] == "a red circle to the right"
    assert mirrored["attributes"]["objects"][0]["position"] == "right"
    xs = torch.nonzero(_object_mask(mirrored["image"], "red"), as_tuple=True)[1].float()
    assert xs.mean() > 20
    assert sample["attributes"]["objects"][0]["position"] == "left"  # input untouched


@pytest.mark.parametrize("resolution", [64, 128])
def test_larger_resolutions(resolution):
    sample = ShapesDataset("test", 10, resolution, seed=0)[0]
    assert sample["image"].shape == (3, resolution, resolution)
    assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["image"].std() > 0.05


@pytest.mark.parametrize("bad", [8, 0, -32, 32.5, "32", True, None])
def test_resolution_is_validated(bad):
    with pytest.raises(ValueError, match="resolution"):
        ShapesDataModule(resolution=bad)


def test_generation_speed_32px():
    ds = ShapesDataset("train", 50_000, 32, seed=0)
    ds.__getitems__(range(64))  # warm-up
    start, n = time.process_time(), 0
    while n < 2048:
        ds.__getitems__(range(n, n + 256))
        n += 256
    rate = n / (time.process_time() - start)
    assert rate > 2000, f"{rate:.0f} images/s at 32 px"


def test_datamodule_batches_and_loader_settings():
    start = time.perf_counter()
    dm = ShapesDataModule(batch_size=8, num_workers=0, resolution=32, seed=0, train_size=20, val_size=12, test_size=4)
    assert time.perf_counter() - start < 0.5 and not dm._datasets  # nothing generated at construction
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last and len(train) == 2 and len(val) == 2
    batch = next(iter(train))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) and c for c in batch["caption"])
    assert all(a["objects"] for a in batch["attributes"])
    # shuffled with a seeded generator: two fresh loaders give the same order, unlike val order
    first = [c for b in ShapesDataModule(batch_size=8, num_workers=0, seed=0, train_size=20).train_dataloader() for c in b["caption"]]
    again = [c for b in ShapesDataModule(batch_size=8, num_workers=0, seed=0, train_size=20).train_dataloader() for c in b["caption"]]
    assert first == again
    in_order = [s["caption"] for s in dm.dataset("train").__getitems__(range(20))]
    assert first != in_order[:16]
    workers = ShapesDataModule(batch_size=4, num_workers=2, seed=0).train_dataloader()
    assert workers.persistent_workers and workers.num_workers == 2
