"""`python eval.py`: a composed config in, a sampler comparison report (or txt2img PNGs) out.

Everything a user can get wrong is checked by `plan_sampled_sets` before any model is loaded or
any process is started, so a typo costs seconds, not an hour of sampling. Then Lightning Fabric
starts the processes (`devices=N`, or torchrun's), each draws its share of the global batches
(`ldmkit.eval.sampling`), and rank 0 merges, writes `report.md`/`report.html`/`metrics.json`
into the run folder and logs to the configured loggers.
"""

from __future__ import annotations

import hashlib
import html
import inspect
import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ldmkit.artifacts import PRODUCERS, ArtifactError, read_artifact_config
from ldmkit.diffusion import SAMPLERS
from ldmkit.eval.sampling import PromptSet, Setting, format_row, make_prompt_set, settings_grid

log = logging.getLogger(__name__)

TASKS = ("sampled_sets", "txt2img")
_LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers", "pin_memory", "log_skips_every_n_steps")
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class EvalConfigError(ValueError):
    """An eval config cannot run; the message says what was wrong and what to change."""


# --- checks shared by both tasks ----------------------------------------------------------


def as_list(value: Any) -> list[Any]:
    """`steps=20` and `steps=[10,20]` alike."""
    if isinstance(value, (ListConfig, list, tuple)):
        return list(value)
    return [] if value is None else [value]


def check_ckpt(ckpt: Any) -> tuple[Path, dict[str, Any]]:
    """The ldm artifact folder (or a run folder holding one) and its config.json."""
    hint = f"Pass ckpt=<the `artifact/` folder of a `{PRODUCERS['ldm']}` run>."
    if ckpt in (None, "", "???"):
        raise EvalConfigError(f"ckpt is not set. {hint}")
    path = Path(str(ckpt)).expanduser()
    if path.is_file():
        sibling = path.parent.parent / "artifact" if path.parent.name == "checkpoints" else None
        found = f" This run's artifact is at '{sibling}': ckpt={sibling}." if sibling and (sibling / "config.json").is_file() else ""
        raise EvalConfigError(
            f"ckpt='{ckpt}' is a file (a Lightning training checkpoint?), but eval samples from an exported ldm "
            f"artifact folder (weights.safetensors + config.json, with the autoencoder and CLIP it references). "
            f"`{PRODUCERS['ldm']}` writes it to <run>/artifact when training ends.{found} {hint}"
        )
    if path.is_dir() and not (path / "config.json").is_file() and (path / "artifact" / "config.json").is_file():
        path = path / "artifact"  # a training run folder: use its artifact
    try:
        config = read_artifact_config(path, "ldm")
    except ArtifactError as err:
        raise EvalConfigError(f"ckpt='{ckpt}': {err}") from err
    for key in ("autoencoder", "text_encoder"):
        if not Path(config[key]).exists():
            raise EvalConfigError(
                f"ckpt='{ckpt}' references its {key} at '{config[key]}', which does not exist. Copy that folder "
                f"back, or edit '{key}' in {path / 'config.json'} to point at it."
            )
    return path, config


def check_samplers(names: Sequence[Any], key: str = "samplers") -> list[str]:
    if not names:
        raise EvalConfigError(f"{key} is empty; choose from {', '.join(SAMPLERS)}.")
    unknown = [str(n) for n in names if str(n) not in SAMPLERS]
    if unknown:
        raise EvalConfigError(f"Unknown sampler {', '.join(map(repr, unknown))} in {key}; valid samplers: "
                              f"{', '.join(SAMPLERS)}.")
    return [str(n) for n in names]


def check_steps(values: Sequence[Any]) -> list[int]:
    if not values:
        raise EvalConfigError("steps is empty; pass e.g. steps=20 or steps=[10,20,50].")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EvalConfigError(f"steps must be whole numbers >= 1, got {v!r} (in steps={list(values)}); "
                                  "e.g. steps=[10,20,50].")
    return [int(v) for v in values]


def check_guidance(values: Sequence[Any]) -> list[float]:
    if not values:
        raise EvalConfigError("guidance is empty; pass e.g. guidance=4 or guidance=[1.5,3,5,7.5].")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise EvalConfigError(f"guidance scales must be numbers, got {v!r} (in guidance={list(values)}).")
    return [float(v) for v in values]


def check_size(cfg: DictConfig, ldm_config: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the samples: the model's training resolution unless set."""
    resolution = int(ldm_config.get("resolution") or 8 * ldm_config["latent"]["downsampling_factor"])
    factor = int(ldm_config["latent"]["downsampling_factor"])
    height, width = cfg.get("height") or resolution, cfg.get("width") or resolution
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
            raise EvalConfigError(f"{name}={value!r}: must be a positive multiple of the autoencoder's downsampling "
                                  f"factor {factor} (the model was trained at {resolution}).")
    return height, width


def check_positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalConfigError(f"{key} must be a whole number >= 1, got {value!r}.")
    return value


GRID_OPTIONS = ("spacing", "sigma_min", "sigma_max", "rho", "steps_offset")  # every sampler walks the same grid


def accepted_options(sampler: str) -> set[str]:
    """Options `ldmkit.diffusion.sample` passes on to this sampler (its keyword-only parameters + grid options)."""
    parameters = inspect.signature(SAMPLERS[sampler]).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY} - {"generator", "callback"} | set(GRID_OPTIONS)


def check_sampler_options(cfg: DictConfig, samplers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per sampler: the sampler group's spacing (and eta, for the sampler it names) plus `sampler_options`,
    each given only to the samplers that take it."""
    extra = cfg.get("sampler_options") or {}
    if not isinstance(extra, (DictConfig, dict)):
        raise EvalConfigError(f"sampler_options must be a mapping like {{eta: 0.5}}, got {extra!r}.")
    extra = dict(OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else extra)
    known = set().union(*(accepted_options(s) for s in samplers))
    unknown = sorted(set(extra) - known)
    if unknown:
        raise EvalConfigError(f"sampler_options {unknown} are taken by none of {list(samplers)}; they take "
                              f"{sorted(known)}.")
    group = cfg.get("sampler") or {}
    out = {}
    for name in samplers:
        options = {"spacing": group.get("spacing")}
        if group.get("name") == name:
            options["eta"] = group.get("eta")
        options.update(extra)
        out[name] = {k: v for k, v in options.items() if v is not None and k in accepted_options(name)}
    return out


def read_prompts_file(path: Any) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise EvalConfigError(f"prompts_file='{path}' does not exist; pass a text file with one prompt per line.")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EvalConfigError(f"prompts_file='{path}' holds no prompts (it is empty or blank); write one prompt "
                              "per line, or drop prompts_file to use the dataset's held-out captions.")
    return prompts


# --- the sampled-sets plan ----------------------------------------------------------------


@dataclass
class EvalPlan:
    """Everything `run_sampled_sets` needs, checked."""

    ckpt: Path
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
    inception: Path | None
    clip: tuple[str, str | None, str] | None  # (path, open_clip arch or None, description)
    prompt_accuracy: bool
    notes: list[str] = field(default_factory=list)


def resolve_inception(cfg: DictConfig) -> Path | None:
    if not cfg.metrics.get("fid", True):
        return None
    from ldmkit.eval.fid import INCEPTION_WEIGHTS_FILENAME, InceptionWeightsNotFoundError, resolve_inception_weights

    explicit = cfg.get("inception_path")
    if explicit and not Path(str(explicit)).expanduser().is_file():
        raise EvalConfigError(
            f"inception_path='{explicit}' does not exist. Put torch-fidelity's {INCEPTION_WEIGHTS_FILENAME} there, "
            "or drop inception_path to use $LDMKIT_INCEPTION_WEIGHTS / the torch hub cache, "
            "or run without FID/KID: metrics.fid=false."
        )
    try:
        return resolve_inception_weights(explicit or None)
    except InceptionWeightsNotFoundError as err:
        message = str(err).replace("eval.inception_path=", "inception_path=").replace("eval.inception_path", "inception_path")
        raise EvalConfigError(f"{message}\nOr run without FID/KID (their columns become n/a): metrics.fid=false.") from err


def resolve_clip(cfg: DictConfig, ldm_config: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """(path, arch, description) of the CLIP model that scores; default: the LDM's own text encoder."""
    if not cfg.metrics.get("clip_score", True):
        return None
    explicit, arch = cfg.get("clip"), cfg.get("clip_arch")
    if explicit:
        path = Path(str(explicit)).expanduser()
        if path.is_dir():
            try:
                clip_config = read_artifact_config(path, "clip")
            except ArtifactError as err:
                raise EvalConfigError(f"clip='{explicit}': {err} Or turn CLIP score off: metrics.clip_score=false.") from err
            name = clip_config.get("model_name") or "custom open_clip config"
            return str(path.resolve()), None, f"clip artifact {path.resolve()} ({name})"
        if not path.is_file():
            raise EvalConfigError(f"clip='{explicit}' does not exist; pass a clip artifact folder or an open_clip "
                                  "checkpoint file (with clip_arch=ViT-B-32 or similar).")
        if not arch:
            raise EvalConfigError(f"clip='{explicit}' is an open_clip checkpoint file: also pass its architecture, "
                                  "e.g. clip_arch=ViT-B-32.")
        return str(path.resolve()), str(arch), f"open_clip {arch} from {path.resolve()}"
    text_encoder = Path(ldm_config["text_encoder"])
    options = ldm_config.get("text_encoder_options") or {}
    if text_encoder.is_dir():
        try:
            clip_config = read_artifact_config(text_encoder, "clip")
        except ArtifactError:
            clip_config = None
        if clip_config is not None:
            name = clip_config.get("model_name") or "custom open_clip config"
            return str(text_encoder), None, f"clip artifact {text_encoder} ({name}; the LDM's own text encoder)"
    elif text_encoder.is_file() and options.get("model_name"):
        arch = str(options["model_name"])
        return str(text_encoder), arch, f"open_clip {arch} from {text_encoder} (the LDM's own text encoder)"
    raise EvalConfigError(
        f"CLIP score needs a CLIP model and the LDM's text encoder '{text_encoder}' is not one this can load. "
        "Pass clip=<clip artifact folder> (or clip=<open_clip checkpoint> clip_arch=<architecture>), "
        "or turn CLIP score off: metrics.clip_score=false."
    )


def _dataset_length(dataset: Any) -> int | None:
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def plan_sampled_sets(cfg: DictConfig) -> EvalPlan:
    """Check the whole config (cheap: no weights are read, no image is drawn)."""
    ckpt, ldm_config = check_ckpt(cfg.get("ckpt"))
    samplers = check_samplers(as_list(cfg.get("samplers")))
    settings = settings_grid(samplers, check_steps(as_list(cfg.get("steps"))), check_guidance(as_list(cfg.get("guidance"))))
    height, width = check_size(cfg, ldm_config)
    batch_size = check_positive_int(cfg, "batch_size")
    check_positive_int(cfg, "devices")
    sampler_options = check_sampler_options(cfg, samplers)
    split = str(cfg.get("split", "test"))
    if split not in ("train", "val", "test"):
        raise EvalConfigError(f"split={split!r}: use test (held-out), val or train.")
    file_prompts = read_prompts_file(cfg.prompts_file) if cfg.get("prompts_file") else None
    inception = resolve_inception(cfg)
    clip = resolve_clip(cfg, ldm_config)

    datamodule, length = None, None
    if file_prompts is None or inception is not None:  # captions and/or real images come from the data
        from hydra.utils import instantiate

        datamodule = instantiate(cfg.data)
        try:
            dataset = datamodule.dataset(split)
        except Exception as err:  # missing shards / folders: the datamodule's own actionable message
            raise EvalConfigError(f"data split '{split}' cannot be read: {err}") from err
        if dataset is None:
            raise EvalConfigError(f"data split '{split}' is empty in this data config; pick another split= "
                                  "or give prompts_file= (and metrics.fid=false).")
        length = _dataset_length(dataset)

    num_samples = cfg.get("num_samples")
    if num_samples is None:
        num_samples = len(file_prompts) if file_prompts is not None else length
        if num_samples is None:
            raise EvalConfigError(f"num_samples is not set and the '{split}' split has no length (a stream); "
                                  "set num_samples=N.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise EvalConfigError(f"num_samples must be a whole number >= 1, got {num_samples!r}.")
    if num_samples < batch_size:
        raise EvalConfigError(
            f"num_samples={num_samples} is smaller than batch_size={batch_size}: every setting would draw a single "
            f"partial batch and FID/KID on so few images mean little. Raise num_samples (>= {batch_size}; thousands "
            f"for FID) or lower batch_size (batch_size={num_samples})."
        )
    if length is not None and num_samples > length:
        need = "held-out captions" if file_prompts is None else "real images for FID/KID"
        raise EvalConfigError(
            f"num_samples={num_samples} but the '{split}' split of this data config holds only {length} {need}. "
            f"Lower num_samples (<= {length}) or use a larger split (e.g. data.{split}_size=... for shapes)."
        )
    if inception is not None and num_samples < 2:
        raise EvalConfigError("FID needs num_samples >= 2 (a covariance); raise num_samples or set metrics.fid=false.")

    prompt_accuracy = _plan_prompt_accuracy(cfg, datamodule, file_prompts, height, width)
    return EvalPlan(
        ckpt=ckpt, ldm_config=ldm_config, settings=settings, num_samples=num_samples, batch_size=batch_size,
        height=height, width=width, base_seed=int(cfg.get("base_seed", 0)),
        negative_prompt=str(cfg.get("negative_prompt") or ""), guidance_rescale=float(cfg.get("guidance_rescale", 0.0)),
        sampler_options=sampler_options, split=split, datamodule=datamodule, file_prompts=file_prompts,
        inception=inception, clip=clip, prompt_accuracy=prompt_accuracy,
    )


def _plan_prompt_accuracy(cfg: DictConfig, datamodule: Any, file_prompts: list[str] | None, height: int, width: int) -> bool:
    from ldmkit.data.shapes import ShapesDataModule

    wanted = cfg.metrics.get("prompt_accuracy", "auto")
    if wanted in (False, None, "false"):
        return False
    possible = isinstance(datamodule, ShapesDataModule) and file_prompts is None and height == width
    if wanted == "auto":
        return possible
    if not possible:
        raise EvalConfigError(
            "metrics.prompt_accuracy=true needs data=shapes with its own held-out captions (they carry the attributes "
            "the judge checks) and square samples; use metrics.prompt_accuracy=auto or false."
        )
    return True


# --- processes ----------------------------------------------------------------------------


def make_fabric(cfg: DictConfig):
    from lightning.fabric import Fabric

    devices, num_nodes = int(cfg.get("devices", 1)), int(cfg.get("num_nodes", 1))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun started the processes: one device per local rank
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
        num_nodes = max(1, int(os.environ.get("WORLD_SIZE", devices)) // devices)
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    return Fabric(accelerator=cfg.get("accelerator", "auto"), devices=devices, num_nodes=num_nodes, strategy=strategy)


@contextmanager
def launched(fabric):
    """`fabric.launch()` (starts ranks 1..N-1 by re-running the command, Hydra-multirun aware), and on
    exit the process group closed and the launcher's environment restored, so a next multirun job starts clean."""
    from lightning.fabric.strategies.launchers import subprocess_script

    from ldmkit.lit.distributed import hydra_job_command

    before = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    original = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = hydra_job_command
    try:
        fabric.launch()
    finally:
        subprocess_script._hydra_subprocess_cmd = original
    try:
        yield fabric
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_gather(world_size: int):
    if world_size == 1:
        return None
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    return gather


def rank_zero_first(fabric, gather, fn):
    """`fn()` on rank 0 (which fills caches), then on the others; an error on rank 0 stops every rank."""
    result, error = None, None
    if fabric.global_rank == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks know
            error = err
    if gather is not None:
        errors = gather(None if error is None else f"{type(error).__name__}: {error}")
        if errors[0] is not None and fabric.global_rank != 0:
            raise RuntimeError(f"rank 0 failed while preparing the evaluation: {errors[0]}")
    if error is not None:
        raise error
    return result if fabric.global_rank == 0 else fn()


# --- building what scores -----------------------------------------------------------------


def data_identity(cfg: DictConfig, datamodule: Any) -> str:
    """Reference statistics depend on the data config (seed, sizes, probabilities...), not on loader settings."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    content = {k: v for k, v in data.items() if k not in _LOADER_KEYS}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{getattr(datamodule, 'name', type(datamodule).__name__)}-{digest}"


def heldout_captions(datamodule: Any, split: str, count: int) -> tuple[list[str], list[dict]]:
    """The first `count` captions (and attributes) of the split, in order."""
    captions: list[str] = []
    targets: list[dict] = []
    for batch in datamodule.dataloader(split):
        captions += list(batch["caption"])
        targets += list(batch.get("attributes") or [{}] * len(batch["caption"]))
        if len(captions) >= count:
            break
    if len(captions) < count:
        raise EvalConfigError(f"the '{split}' split yielded only {len(captions)} captions, num_samples={count}; "
                              "lower num_samples.")
    return captions[:count], targets[:count]


def build_prompt_set(plan: EvalPlan) -> PromptSet:
    if plan.file_prompts is not None:
        return make_prompt_set(plan.file_prompts, plan.num_samples, plan.base_seed,
                               source=f"prompts file ({len(plan.file_prompts)} prompts, cycled)")
    captions, targets = heldout_captions(plan.datamodule, plan.split, plan.num_samples)
    name = getattr(plan.datamodule, "name", "data")
    return make_prompt_set(captions, plan.num_samples, plan.base_seed, targets,
                           source=f"the first {plan.num_samples} captions of the {name} '{plan.split}' split")


def build_reference(cfg: DictConfig, plan: EvalPlan, extractor) -> Any:
    from ldmkit.eval.fid import reference_stats

    dm = plan.datamodule
    reference = reference_stats(
        (batch["image"] for batch in dm.dataloader(plan.split)), extractor, Path(cfg.cache_dir) / "fid",
        dataset=data_identity(cfg, dm), split=plan.split, resolution=int(dm.resolution), max_images=plan.num_samples,
    )
    if reference.num_samples < plan.num_samples:
        raise EvalConfigError(f"the '{plan.split}' split has only {reference.num_samples} real images for FID/KID, "
                              f"num_samples={plan.num_samples}; lower num_samples.")
    return reference


def build_clip_score(plan: EvalPlan, device: torch.device):
    from ldmkit.eval.clip_score import CLIPScore
    from ldmkit.nn.clip import load_clip

    path, arch, description = plan.clip
    model, tokenizer, _ = load_clip(path, device=device, model_name=arch)
    return CLIPScore.from_open_clip(model, tokenizer, model_name=description)


def build_judge(cfg: DictConfig, plan: EvalPlan, device: torch.device):
    from ldmkit.eval.attributes import load_attribute_classifier

    steps = int(cfg.metrics.get("judge_steps", 300))
    return load_attribute_classifier(Path(cfg.cache_dir) / "judge", plan.height, steps).to(device)


# --- the run ------------------------------------------------------------------------------


def run_sampled_sets(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    from ldmkit.eval.fid import InceptionFeatureExtractor
    from ldmkit.eval.sampling import Scorers, evaluate_settings
    from ldmkit.txt2img import load_text_to_image

    plan = plan_sampled_sets(cfg)  # every check before a process starts or a weight is read
    fabric = make_fabric(cfg)
    with launched(fabric):
        rank, world_size, device = fabric.global_rank, fabric.world_size, fabric.device
        gather = make_gather(world_size)
        t2i = load_text_to_image(plan.ckpt, device)
        prompt_set = build_prompt_set(plan)
        extractor = InceptionFeatureExtractor(plan.inception, device=device) if plan.inception else None
        reference = rank_zero_first(fabric, gather, lambda: build_reference(cfg, plan, extractor)) if extractor else None
        judge = rank_zero_first(fabric, gather, lambda: build_judge(cfg, plan, device)) if plan.prompt_accuracy else None
        scorers = Scorers(extractor=extractor, clip=build_clip_score(plan, device) if plan.clip else None,
                          judge=judge.predict if judge is not None else None)
        if device.type == "cuda":  # first-call costs (cuBLAS/cuDNN init) stay out of the timings
            first = plan.settings[0]
            t2i.generate(prompt_set.prompts[:1], prompt_set.seeds[:1], sampler=first.sampler, steps=min(first.steps, 2),
                         guidance_scale=first.guidance, height=plan.height, width=plan.width)
        output_dir = Path(cfg.paths.output_dir)
        if gather is not None:  # torchrun-started ranks each composed their own run folder: use rank 0's
            output_dir = Path(gather(str(output_dir))[0])
        if rank == 0:
            log.info("Evaluating %s (%s): %d settings x %d samples on %d process(es), %s", plan.ckpt, t2i.model_hash,
                     len(plan.settings), plan.num_samples, world_size, device)
        rows, grids = evaluate_settings(
            t2i, prompt_set, plan.settings, scorers, batch_size=plan.batch_size, height=plan.height, width=plan.width,
            rank=rank, world_size=world_size, gather=gather, reference=reference,
            kid=bool(cfg.metrics.get("kid", True)), kid_subsets=int(cfg.metrics.get("kid_subsets", 100)),
            kid_subset_size=int(cfg.metrics.get("kid_subset_size", 1000)), negative_prompt=plan.negative_prompt,
            guidance_rescale=plan.guidance_rescale, sampler_options=plan.sampler_options,
            grid_size=min(int(cfg.get("grid_prompts", 8)), plan.num_samples),
            image_dir=output_dir / "images" if cfg.get("save_images") else None,
            on_setting=lambda setting, row: log.info(format_row(row)),
        )
        if rank != 0:
            return {}, {}
        notes = report_notes(cfg, plan, t2i, prompt_set, reference, world_size, device, rows)
        grid_prompts = prompt_set.prompts[: min(int(cfg.get("grid_prompts", 8)), plan.num_samples)]
        paths = write_eval_report(output_dir, rows, grids, notes, title=f"ldmkit sampler evaluation: {t2i.name} "
                                  f"({t2i.model_hash})", prompts=grid_prompts)
        log_to_loggers(cfg, rows, grids)
        log.info("Report: %s and %s", paths["markdown"], paths["html"])
        return scalar_metrics(rows), {"rows": rows, "grids": grids, "report": paths, "notes": notes}


def report_notes(cfg: DictConfig, plan: EvalPlan, t2i: Any, prompt_set: PromptSet, reference: Any,
                 world_size: int, device: torch.device, rows: Sequence[dict]) -> list[str]:
    judged = rows[0].get("judged_prompts", 0) if rows else 0
    notes = [
        f"Model: ldm artifact {plan.ckpt} (weights hash {t2i.model_hash}), samples {plan.width}x{plan.height}.",
        f"Prompts: {prompt_set.source}; sample i is seeded {plan.base_seed} + i, the same for every setting "
        "(paired: every sampler starts from the same noise for a prompt)"
        + (f"; negative prompt {plan.negative_prompt!r}" if plan.negative_prompt else "") + ".",
        "NFE = denoiser evaluations per image, counted as UNet forward calls per batch. With classifier-free "
        "guidance (guidance != 1) one evaluation is one forward of the batched cond+uncond input (2B rows) and "
        "counts once; guidance = 1 runs the conditional half only.",
        "Sampler options: " + "; ".join(f"{name} {options}" for name, options in plan.sampler_options.items())
        + (f"; guidance rescale {plan.guidance_rescale:g}" if plan.guidance_rescale else "") + ".",
        f"s / image = sampling time (text encoding, denoising and decoding; not scoring) summed over the "
        f"{world_size} process(es), divided by the number of images, batches of {plan.batch_size}.",
        ("peak mem = torch.cuda.max_memory_allocated during the setting (max over processes)." if device.type == "cuda"
         else "peak mem = CPU process RSS high-water mark (ru_maxrss, max over processes): it never decreases, so "
              "it covers everything the process did up to the end of that setting, not the setting alone."),
    ]
    if reference is not None:
        from ldmkit.eval.fid import INCEPTION_WEIGHTS_FILENAME

        notes.append(f"FID/KID: against the first {reference.num_samples} real images of the '{plan.split}' split "
                     f"({getattr(plan.datamodule, 'name', 'data')}, {plan.datamodule.resolution}px), torch-fidelity "
                     f"Inception-v3 ({plan.inception.name if plan.inception else INCEPTION_WEIGHTS_FILENAME}); KID "
                     f"subset size min({cfg.metrics.get('kid_subset_size', 1000)}, N).")
    else:
        notes.append("FID/KID: n/a (metrics.fid=false).")
    notes.append(f"CLIP score: 100 * max(cos, 0) with {plan.clip[2]}." if plan.clip
                 else "CLIP score: n/a (metrics.clip_score=false).")
    if plan.prompt_accuracy:
        notes.append(f"Prompt accuracy: colour and shape read back by the shapes attribute classifier "
                     f"(ldmkit.eval.attributes), judged on the {judged} single-object prompts of {plan.num_samples}; "
                     "two-object prompts are not judged.")
    else:
        notes.append("Prompt accuracy: n/a (needs data=shapes held-out captions).")
    return notes


def write_eval_report(out_dir: Path, rows: list[dict], grids: dict, notes: list[str], *, title: str,
                      prompts: Sequence[str]) -> dict[str, Path]:
    """report.md + report.html (ldmkit.eval.report) with a section on how the numbers were measured, and
    metrics.json with the rows."""
    from ldmkit.eval.report import write_report

    paths = write_report(out_dir, rows, grids, title=title, prompts=prompts)
    section = "\n".join(["", "## How these numbers were measured", "", *[f"- {n}" for n in notes], ""])
    with open(paths["markdown"], "a", encoding="utf-8") as f:
        f.write(section)
    page = paths["html"].read_text(encoding="utf-8")
    notes_html = "<h2>How these numbers were measured</h2><ul class=\"notes\">" + "".join(
        f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    paths["html"].write_text(page.replace("</body>", notes_html + "</body>", 1), encoding="utf-8")
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps({"rows": rows, "notes": notes}, indent=2, default=str), encoding="utf-8")
    paths["metrics"] = metrics
    return paths


def scalar_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Flat `sampler/steps/guidance/metric` floats (for loggers and Hydra sweepers)."""
    from ldmkit.eval.report import flatten_row

    out: dict[str, float] = {}
    for row in rows:
        prefix = f"{row['sampler']}/{row['steps']}/{row['guidance']:g}"
        for key, value in flatten_row(row).items():
            if key in ("sampler", "steps", "guidance") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and value is not None:
                out[f"{prefix}/{key}"] = float(value)
    return out


def log_to_loggers(cfg: DictConfig, rows: list[dict], grids: dict) -> None:
    """W&B: the results table and grids (`log_report_to_wandb`); other loggers: the scalar metrics."""
    if not cfg.get("logger"):
        return
    from lightning.pytorch.loggers import Logger, WandbLogger

    from ldmkit.eval.report import log_report_to_wandb
    from ldmkit.pipeline import instantiate_group

    logger_cfg = cfg.logger.copy()
    defaults = {"name": f"{cfg.get('task_name', 'eval')}-{Path(str(cfg.ckpt)).parent.name}", "group": "eval"}
    with open_dict(logger_cfg):
        for node in logger_cfg.values():  # the train-run defaults name runs after the model group eval lacks
            if isinstance(node, DictConfig):
                raw = OmegaConf.to_container(node, resolve=False)
                for key, default in defaults.items():
                    if key in raw and (raw[key] is None or "choices.model" in str(raw[key])):
                        node[key] = default
    loggers = instantiate_group(logger_cfg, Logger)
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config.pop("logger", None)
    for logger in loggers:
        logger.log_hyperparams(config)
        if isinstance(logger, WandbLogger):
            log_report_to_wandb(rows, grids, logger.experiment)
        else:
            logger.log_metrics(scalar_metrics(rows))
        logger.finalize("success")
    wandb = __import__("sys").modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run_evaluation(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    task = cfg.get("task", "sampled_sets")
    if task == "sampled_sets":
        return run_sampled_sets(cfg)
    if task == "txt2img":
        from ldmkit.eval.txt2img_cli import run_txt2img

        return run_txt2img(cfg)
    raise EvalConfigError(f"task={task!r}: use task=sampled_sets (FID/KID/CLIP score report) or task=txt2img.")
