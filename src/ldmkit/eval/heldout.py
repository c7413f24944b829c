"""Prompt-following on `shapes` with prompts the model never saw verbatim.

Every colour × shape pair is asked for with a phrasing that no training caption template
produces ("an image showing one red circle"), from fixed seeds; an independent attribute
classifier (`ldmkit.eval.attributes`) reads back colour and shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ldmkit.data.shapes import COLOURS, SHAPES, ShapesDataset
from ldmkit.eval.attributes import attribute_accuracy, load_attribute_classifier
from ldmkit.lit.images import make_grid, to_pil
from ldmkit.nn.autoencoder import round_trip
from ldmkit.txt2img import load_text_to_image

HELDOUT_TEMPLATE = "an image showing one {colour} {shape}"


def heldout_prompts() -> list[tuple[str, dict]]:
    return [
        (HELDOUT_TEMPLATE.format(colour=c, shape=s), {"objects": [{"colour": c, "shape": s}]})
        for s in SHAPES
        for c in COLOURS
    ]


def _hits(judge, images: torch.Tensor, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Per image: did the judge read back the asked-for colour / shape (bool tensors)."""
    logits = judge(images)
    hits = {}
    for field, values in (("colour", COLOURS), ("shape", SHAPES)):
        want = torch.tensor([values.index(t["objects"][0][field]) for t in targets])
        hits[field] = logits[field].argmax(1) == want
    return hits


def colour_shape_accuracy(judge, images: torch.Tensor, targets: Sequence[dict]) -> dict[str, float]:
    hits = _hits(judge, images, targets)
    return {"colour": float(hits["colour"].float().mean()), "shape": float(hits["shape"].float().mean()),
            "colour+shape": float((hits["colour"] & hits["shape"]).float().mean())}


def accuracy_by_shape(judge, images: torch.Tensor, targets: Sequence[dict]) -> dict[str, float]:
    """colour+shape accuracy of the images of each asked-for shape (the shapes present in `targets`)."""
    hits = _hits(judge, images, targets)
    both = hits["colour"] & hits["shape"]
    asked = [t["objects"][0]["shape"] for t in targets]
    return {shape: float(both[[a == shape for a in asked]].float().mean()) for shape in SHAPES if shape in asked}


def sample_heldout_grid(
    ldm_artifact: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    guidance_scales: Sequence[float] = (3.0, 5.0),
    seeds_per_prompt: int = 2,
    batch_size: int = 36,
    **sampler_options,
) -> dict:
    out = Path(out)
    t2i = load_text_to_image(ldm_artifact)
    resolution = int(t2i.resolution)
    judge = load_attribute_classifier(out / "judge", resolution)
    # how far the judge itself can be trusted: its accuracy on real held-out single-object images
    real = ShapesDataset("test", size=500, resolution=resolution, seed=4242, two_object_prob=0.0).__getitems__(range(500))
    real_images, real_attributes = torch.stack([r["image"] for r in real]), [r["attributes"] for r in real]
    judge_on_real = attribute_accuracy(judge, real_images, real_attributes)
    # how far the autoencoder lets any LDM go: the judge on its reconstructions of those real images (an LDM
    # that learned the latent distribution perfectly would score about this on these prompts)
    recon = round_trip(t2i.autoencoder, real_images)
    judge_on_recon = {**attribute_accuracy(judge, recon, real_attributes),
                      "colour+shape_by_shape": accuracy_by_shape(judge, recon, real_attributes)}

    prompts = heldout_prompts()
    items = [(p, a, 10_000 + k * len(prompts) + i) for k in range(seeds_per_prompt) for i, (p, a) in enumerate(prompts)]
    results: dict[str, dict] = {}
    grid_path = out / "samples.png"
    for g_index, guidance in enumerate(guidance_scales):
        images = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images.append(t2i.generate([c[0] for c in chunk], [c[2] for c in chunk], sampler=sampler, steps=steps,
                                       guidance_scale=guidance, height=resolution, width=resolution,
                                       **sampler_options))
        images = torch.cat(images)
        targets = [c[1] for c in items]
        results[f"guidance_{guidance:g}"] = {**colour_shape_accuracy(judge, images, targets),
                                             "colour+shape_by_shape": accuracy_by_shape(judge, images, targets)}
        if g_index == 0:
            # one row per shape, one column per colour (first seed of each prompt)
            to_pil(make_grid((images[: len(prompts)] + 1) / 2, nrow=len(COLOURS))).resize(
                (len(COLOURS) * (resolution + 2) * 4, len(SHAPES) * (resolution + 2) * 4), 0).save(grid_path)
    return {
        "grid": str(grid_path),
        "grid_layout": f"rows: {', '.join(SHAPES)}; columns: {', '.join(COLOURS)}; guidance {guidance_scales[0]:g}",
        "prompt_template": HELDOUT_TEMPLATE,
        "sampler": sampler,
        "steps": steps,
        "num_images_per_setting": len(items),
        "accuracy": results,
        "judge_accuracy_on_real_images": judge_on_real,
        "judge_accuracy_on_autoencoder_reconstructions": judge_on_recon,
    }
