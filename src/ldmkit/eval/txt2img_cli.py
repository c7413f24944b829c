"""`python eval.py task=txt2img ckpt=ARTIFACT prompt="..." [negative_prompt=... sampler=euler_a steps=40
guidance=7 seed=N width=W height=H num_images=4]`: PNGs with their generation parameters embedded
(A1111 "parameters" text chunk), a progress bar over the sampler's steps.

Image i is seeded `seed + i` (seed=-1 draws a random one); it is the same image `eval.py`'s sampled sets
draw for that prompt, seed and setting, whatever `batch_size`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldmkit.eval.runner import (
    EvalConfigError,
    as_list,
    check_ckpt,
    check_guidance,
    check_positive_int,
    check_sampler_options,
    check_samplers,
    check_size,
    check_steps,
)
from ldmkit.eval.sampling import Setting, generation_parameters

log = logging.getLogger(__name__)


def _single(cfg: DictConfig, key: str, values: list[Any]) -> Any:
    if len(values) != 1:
        raise EvalConfigError(f"task=txt2img takes one {key}, got {key}={values}; sampled sets (the default task) "
                              "compare several.")
    return values[0]


def plan_txt2img(cfg: DictConfig) -> dict[str, Any]:
    """Every check before the model is loaded."""
    ckpt, ldm_config = check_ckpt(cfg.get("ckpt"))
    prompt = cfg.get("prompt")
    if not prompt or not str(prompt).strip():
        raise EvalConfigError('task=txt2img needs a prompt: prompt="a red circle on the left".')
    group = cfg.get("sampler") or {}
    sampler = check_samplers([group.get("name")], key="sampler")[0]
    setting = Setting(
        sampler,
        _single(cfg, "steps", check_steps(as_list(cfg.get("steps")))),
        _single(cfg, "guidance", check_guidance(as_list(cfg.get("guidance")))),
    )
    height, width = check_size(cfg, ldm_config)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalConfigError(f"seed must be a whole number (-1: random), got {seed!r}.")
    if seed < 0:
        seed = random.SystemRandom().randrange(2**32)
    return {
        "ckpt": ckpt, "prompt": str(prompt), "negative_prompt": str(cfg.get("negative_prompt") or ""),
        "setting": setting, "height": height, "width": width, "seed": seed,
        "num_images": check_positive_int(cfg, "num_images"), "batch_size": check_positive_int(cfg, "batch_size"),
        "guidance_rescale": float(cfg.get("guidance_rescale", 0.0)),
        "sampler_options": check_sampler_options(cfg, [sampler])[sampler],
    }


def pick_device(accelerator: str | None) -> torch.device:
    if accelerator in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "gpu":
        accelerator = "cuda"
    return torch.device(accelerator)


def run_txt2img(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    from tqdm.auto import tqdm

    from ldmkit.eval.pngmeta import save_png_with_parameters
    from ldmkit.txt2img import load_text_to_image

    plan = plan_txt2img(cfg)
    t2i = load_text_to_image(plan["ckpt"], pick_device(cfg.get("accelerator")))
    setting: Setting = plan["setting"]
    out_dir = Path(cfg.paths.output_dir)
    seeds = [plan["seed"] + i for i in range(plan["num_images"])]
    batches = [seeds[i : i + plan["batch_size"]] for i in range(0, len(seeds), plan["batch_size"])]
    paths: list[Path] = []
    with tqdm(total=len(batches) * setting.steps, desc=f"{setting.sampler}, {setting.steps} steps", unit="step") as bar:
        for batch in batches:
            images = t2i.generate(
                [plan["prompt"]] * len(batch), batch,
                negative_prompts=[plan["negative_prompt"]] * len(batch) if plan["negative_prompt"] else None,
                sampler=setting.sampler, steps=setting.steps, guidance_scale=setting.guidance,
                guidance_rescale=plan["guidance_rescale"], height=plan["height"], width=plan["width"],
                callback=lambda i, n, x, x0: bar.update(1), **plan["sampler_options"],
            )  # (B, 3, H, W) in [-1, 1]
            for image, seed in zip(images, batch):
                params = generation_parameters(t2i, setting, plan["prompt"], plan["negative_prompt"], seed,
                                               plan["width"], plan["height"], plan["guidance_rescale"],
                                               plan["sampler_options"])
                paths.append(save_png_with_parameters(image, out_dir / f"{len(paths):05d}-{seed}.png", params))
    for path in paths:
        log.info("Wrote %s", path)
    return {}, {"images": paths, "seeds": seeds}
