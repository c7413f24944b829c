"""Every check of `python eval.py` before a process starts or a weight is read: a composed config in,
a typed plan out (built once; nothing after it reads the raw config except the logger setup).

A typo costs seconds, not an hour of sampling: unknown samplers, bad steps/guidance/sizes, a missing or
wrong artifact, missing Inception weights, unreadable prompts files, out-of-range seeds, an output path
that is a file, too few held-out captions, ... all fail here with the fix. The checks of single values are in
`ldmkit.eval.checks`; this module assembles them into the two tasks' plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldmkit.eval.checks import (
    as_list,
    check_ckpt,
    check_guidance,
    check_output_dir,
    check_positive_int,
    check_sampler_options,
    check_samplers,
    check_samplers_fit_process,
    check_seeds,
    check_steps,
    data_identity,
    read_prompts_file,
)
from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics import EvalContext, MetricSlot, build_metrics
from ldmkit.eval.models import EvalModel, check_models_size, plan_models, single_ckpt
from ldmkit.eval.sampling import Setting

__all__ = ["EvalConfigError", "SampledSetsPlan", "Txt2ImgPlan", "plan_sampled_sets", "plan_txt2img"]


# --- the sampled-sets plan ----------------------------------------------------------------


@dataclass
class SampledSetsPlan:
    """Everything `ldmkit.eval.sampled_sets.run_sampled_sets` needs, checked."""

    ckpt: Path  # ckpt, ldm_config, settings: the first model's (`models` has every model of the run)
    ldm_config: dict[str, Any]
    settings: list[Setting]
    num_samples: int
    batch_size: int
    height: int
    width: int
    base_seed: int
    negative_prompt: str
    guidance_rescale: float
    sampler_options: dict[str, dict[str, Any]]  # per sampler name
    split: str
    datamodule: Any | None
    file_prompts: list[str] | None
    metrics: list[MetricSlot]  # configured order; `slot.metric` is None when off or n/a for this run
    context: EvalContext  # what the metrics see
    output_dir: Path
    save_images: bool
    grid_size: int
    accelerator: str
    devices: int
    num_nodes: int
    models: list[EvalModel] = field(default_factory=list)  # every model of the run (ldmkit.eval.models)
    model_notes: list[str] = field(default_factory=list)  # samplers a model's process does not define, skipped

    @property
    def active(self) -> list[Any]:
        return [slot.metric for slot in self.metrics if slot.metric is not None]

    @property
    def inactive(self) -> list[type]:
        return [slot.cls for slot in self.metrics if slot.metric is None]


def _dataset_length(dataset: Any) -> int | None:
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def _load_split(cfg: DictConfig, split: str) -> tuple[Any, int | None]:
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    try:
        dataset = datamodule.dataset(split)
    except Exception as err:  # missing shards / folders: the datamodule's own actionable message
        raise EvalConfigError(f"data split '{split}' cannot be read: {err}") from err
    if dataset is None:
        raise EvalConfigError(f"data split '{split}' is empty in this data config; pick another split= "
                              "or give prompts_file= (and metrics.fid=false).")
    return datamodule, _dataset_length(dataset)


def _check_num_samples(value: Any, batch_size: int, split: str, length: int | None, from_file: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalConfigError(f"num_samples must be a whole number >= 1, got {value!r}.")
    if value < batch_size:
        raise EvalConfigError(
            f"num_samples={value} is smaller than batch_size={batch_size}: every setting would draw a single "
            f"partial batch and FID/KID on so few images mean little. Raise num_samples (>= {batch_size}; thousands "
            f"for FID) or lower batch_size (batch_size={value})."
        )
    if length is not None and value > length:
        need = "real images for FID/KID" if from_file else "held-out captions"
        raise EvalConfigError(
            f"num_samples={value} but the '{split}' split of this data config holds only {length} {need}. "
            f"Lower num_samples (<= {length}) or use a larger split (e.g. data.{split}_size=... for shapes)."
        )
    return value


def plan_sampled_sets(cfg: DictConfig) -> SampledSetsPlan:
    """Check the whole config (cheap: no weights are read, no image is drawn)."""
    output_dir = check_output_dir(cfg)
    samplers = check_samplers(as_list(cfg.get("samplers")))
    models, model_notes = plan_models(cfg.get("ckpt"), samplers, check_steps(as_list(cfg.get("steps"))),
                                      check_guidance(as_list(cfg.get("guidance"))))
    ckpt, ldm_config, settings = models[0].path, models[0].config, list(models[0].settings)
    height, width = check_models_size(cfg, models)
    batch_size = check_positive_int(cfg, "batch_size")
    devices, num_nodes = check_positive_int(cfg, "devices"), check_positive_int(cfg, "num_nodes")
    sampler_options = check_sampler_options(cfg, samplers)
    split = str(cfg.get("split", "test"))
    if split not in ("train", "val", "test"):
        raise EvalConfigError(f"split={split!r}: use test (held-out), val or train.")
    file_prompts = read_prompts_file(cfg.prompts_file) if cfg.get("prompts_file") else None
    metrics = build_metrics(cfg.get("metrics"), cfg)

    datamodule, length = None, None
    if file_prompts is None or any(slot.on and slot.cls.needs_real_images for slot in metrics):
        datamodule, length = _load_split(cfg, split)  # captions and/or real images come from the data
    num_samples = cfg.get("num_samples")
    if num_samples is None:
        num_samples = len(file_prompts) if file_prompts is not None else length
        if num_samples is None:
            raise EvalConfigError(f"num_samples is not set and the '{split}' split has no length (a stream); "
                                  "set num_samples=N.")
    num_samples = _check_num_samples(num_samples, batch_size, split, length, file_prompts is not None)
    base_seed = check_seeds("base_seed", cfg.get("base_seed", 0), num_samples)

    context = EvalContext(
        ldm_config=ldm_config, datamodule=datamodule, split=split, file_prompts=file_prompts,
        num_samples=num_samples, height=height, width=width, cache_dir=Path(str(cfg.cache_dir)),
        data_identity=data_identity(cfg, datamodule) if datamodule is not None else "",
        enabled=frozenset(slot.name for slot in metrics if slot.on),
    )
    for slot in metrics:
        if slot.on and not slot.metric.check(context):
            slot.metric = None  # n/a for this run (e.g. prompt accuracy without a judge for this data)
    return SampledSetsPlan(
        ckpt=ckpt, ldm_config=ldm_config, settings=settings, num_samples=num_samples, batch_size=batch_size,
        height=height, width=width, base_seed=base_seed, negative_prompt=str(cfg.get("negative_prompt") or ""),
        guidance_rescale=float(cfg.get("guidance_rescale", 0.0)), sampler_options=sampler_options, split=split,
        datamodule=datamodule, file_prompts=file_prompts, metrics=metrics, context=context, output_dir=output_dir,
        save_images=bool(cfg.get("save_images")), grid_size=min(int(cfg.get("grid_prompts", 8)), num_samples),
        accelerator=str(cfg.get("accelerator", "auto")), devices=devices, num_nodes=num_nodes,
        models=models, model_notes=model_notes,
    )


# --- the txt2img plan ---------------------------------------------------------------------


@dataclass
class Txt2ImgPlan:
    ckpt: Path
    prompt: str
    negative_prompt: str
    setting: Setting
    height: int
    width: int
    seed: int
    num_images: int
    batch_size: int
    guidance_rescale: float
    sampler_options: dict[str, Any]
    output_dir: Path
    accelerator: str


def _single(key: str, values: list[Any]) -> Any:
    if len(values) != 1:
        raise EvalConfigError(f"task=txt2img takes one {key}, got {key}={values}; sampled sets (the default task) "
                              "compare several.")
    return values[0]


def plan_txt2img(cfg: DictConfig) -> Txt2ImgPlan:
    """Every check before the model is loaded."""
    output_dir = check_output_dir(cfg)
    ckpt, ldm_config = check_ckpt(single_ckpt(cfg.get("ckpt"), "txt2img"))
    prompt = cfg.get("prompt")
    if not prompt or not str(prompt).strip():
        raise EvalConfigError('task=txt2img needs a prompt: prompt="a red circle on the left".')
    group = cfg.get("sampler") or {}
    sampler = check_samplers([group.get("name")], key="sampler")[0]
    check_samplers_fit_process([sampler], ldm_config)
    setting = Setting(sampler, _single("steps", check_steps(as_list(cfg.get("steps")))),
                      _single("guidance", check_guidance(as_list(cfg.get("guidance")))))
    height, width = check_models_size(cfg, [EvalModel(None, ckpt, ldm_config, ())])
    num_images = check_positive_int(cfg, "num_images")
    return Txt2ImgPlan(
        ckpt=ckpt, prompt=str(prompt), negative_prompt=str(cfg.get("negative_prompt") or ""), setting=setting,
        height=height, width=width, seed=check_seeds("seed", cfg.get("seed"), num_images, random_allowed=True),
        num_images=num_images, batch_size=check_positive_int(cfg, "batch_size"),
        guidance_rescale=float(cfg.get("guidance_rescale", 0.0)),
        sampler_options=check_sampler_options(cfg, [sampler])[sampler], output_dir=output_dir,
        accelerator=str(cfg.get("accelerator") or "auto"),
    )
