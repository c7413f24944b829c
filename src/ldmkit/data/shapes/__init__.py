"""`shapes`: procedurally generated captioned images of coloured shapes (the embedded default dataset).

A sample is a pure function of ``(seed, split, index)``: a counter-based hash (splitmix64) turns
those three numbers into the uniform draws that pick the scene, so any index renders the same in
any worker, batch or process, and the train/val/test splits use disjoint hash streams.

Scenes hold one object (``1 - two_object_prob`` of them, 70% by default) or two objects at
opposite positions (left/right or top/bottom; large triangles and crosses side by side can touch at
their tips). ``same_pair_prob`` of the two-object scenes (0 by default, so the default data is unchanged; e.g. 0.25 to train counting) are two identical objects,
captioned for counting ("two small red circles side by side"). Each sample carries its attributes so
later stages can score prompt-following::

    {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "left"}],
     "background": "dark", "background_style": "gradient"}

Shapes are drawn from signed distance functions with analytic coverage antialiasing
(``alpha = clamp(0.5 - distance_in_pixels, 0, 1)``) on a `supersample`-times finer grid that is then
box-filtered down, for a whole batch at once (`ShapesDataset.__getitems__`, which DataLoader uses).
Use `make_caption` to build a prompt for given attributes and `render_attributes` to draw
reference images for them.

Modules: `scenes` (vocabulary, draws, scene sampling, attribute validation), `render`, `captions`,
`datamodule` (`ShapesDataset`, `ShapesDataModule` and its evaluation hooks) and `suite` (the
compositional prompt suite, in a phrasing no training caption uses).
"""

from ldmkit.data.shapes.captions import make_caption, mirror_sample
from ldmkit.data.shapes.datamodule import ShapesDataModule, ShapesDataset
from ldmkit.data.shapes.render import default_supersample, render_attributes, render_scenes
from ldmkit.data.shapes.scenes import (
    BACKGROUND_STYLES, BACKGROUNDS, COLOUR_RGB, COLOURS, MIN_RESOLUTION, POSITIONS, SHAPES, SIZES, complete_attributes,
    normalize_attributes, sample_keys, sample_scenes,
)

__all__ = [
    "BACKGROUND_STYLES", "BACKGROUNDS", "COLOUR_RGB", "COLOURS", "MIN_RESOLUTION", "POSITIONS", "SHAPES", "SIZES",
    "ShapesDataModule", "ShapesDataset", "complete_attributes", "default_supersample", "make_caption", "mirror_sample",
    "normalize_attributes", "render_attributes", "render_scenes", "sample_keys", "sample_scenes",
]
