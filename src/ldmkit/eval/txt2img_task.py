"""`python eval.py task=txt2img ckpt=ARTIFACT prompt="..." [negative_prompt=... sampler=euler_a steps=40
guidance=7 seed=N width=W height=H num_images=4]`: PNGs with their generation parameters embedded
(A1111 "parameters" text chunk), a progress bar over the sampler's steps.

Image i is seeded `seed + i` (seed=-1 draws a random one); it is the same image `eval.py`'s sampled sets
draw for that prompt, seed and setting, whatever `batch_size`. Files are numbered on from the highest
number already in the run folder (`00003-<seed>.png` after `00002-...`), so an earlier image is never
replaced.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldmkit.eval.plan import Txt2ImgPlan, plan_txt2img
from ldmkit.eval.pngmeta import save_png_with_parameters
from ldmkit.eval.sampling import generation_parameters

log = logging.getLogger(__name__)
_NUMBERED = re.compile(r"^(\d{5,})-")


def pick_device(accelerator: str | None) -> torch.device:
    if accelerator in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "gpu":
        accelerator = "cuda"
    return torch.device(accelerator)


def next_image_number(folder: Path) -> int:
    """One past the highest `NNNNN-` number of a PNG in `folder` (0 when there is none)."""
    numbers = [int(m[1]) for p in folder.glob("*.png") if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def save_numbered(image: torch.Tensor, folder: Path, seed: int, params: Any) -> Path:
    """`<next number>-<seed>.png`, never over an existing file (another run writing there takes the next)."""
    while True:
        try:
            return save_png_with_parameters(image, folder / f"{next_image_number(folder):05d}-{seed}.png", params,
                                            overwrite=False)
        except FileExistsError:
            continue


def run_txt2img(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    from tqdm.auto import tqdm

    from ldmkit.txt2img import load_text_to_image

    plan: Txt2ImgPlan = plan_txt2img(cfg)
    t2i = load_text_to_image(plan.ckpt, pick_device(plan.accelerator))
    setting = plan.setting
    seeds = [plan.seed + i for i in range(plan.num_images)]
    batches = [seeds[i : i + plan.batch_size] for i in range(0, len(seeds), plan.batch_size)]
    paths: list[Path] = []
    with tqdm(total=len(batches) * setting.steps, desc=f"{setting.sampler}, {setting.steps} steps", unit="step") as bar:
        for batch in batches:
            images = t2i.generate(
                [plan.prompt] * len(batch), batch,
                negative_prompts=[plan.negative_prompt] * len(batch) if plan.negative_prompt else None,
                sampler=setting.sampler, steps=setting.steps, guidance_scale=setting.guidance,
                guidance_rescale=plan.guidance_rescale, height=plan.height, width=plan.width,
                callback=lambda i, n, x, x0: bar.update(1), **plan.sampler_options,
            )  # (B, 3, H, W) in [-1, 1]
            for image, seed in zip(images, batch):
                params = generation_parameters(t2i, setting, plan.prompt, plan.negative_prompt, seed, plan.width,
                                               plan.height, plan.guidance_rescale, plan.sampler_options)
                paths.append(save_numbered(image, plan.output_dir, seed, params))
    for path in paths:
        log.info("Wrote %s", path)
    return {}, {"images": paths, "seeds": seeds}
