"""The checks of single `python eval.py` config values that both tasks share (task, ckpt, samplers and their
options, steps, guidance, sizes, seeds, output folder, prompts file): each returns the checked value or raises
an `EvalConfigError` with the fix. `ldmkit.eval.plan` assembles them into a plan."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldmkit.artifacts import PRODUCERS, ArtifactError, read_artifact_config
from ldmkit.diffusion import SAMPLERS
from ldmkit.diffusion.processes import ProcessError, process_class
from ldmkit.diffusion.samplers import VP_ONLY_SAMPLERS
from ldmkit.eval.errors import EvalConfigError

TASKS = ("sampled_sets", "txt2img")
SEED_LIMIT = 2**63  # seeds are int64 everywhere they go (torch generators, PNG parameters readers)
GRID_OPTIONS = ("spacing", "sigma_min", "sigma_max", "rho", "steps_offset")  # every sampler walks the same grid
_LOADER_KEYS = ("batch_size", "val_batch_size", "num_workers", "pin_memory", "log_skips_every_n_steps")


def as_list(value: Any) -> list[Any]:
    """`steps=20` and `steps=[10,20]` alike."""
    if isinstance(value, (ListConfig, list, tuple)):
        return list(value)
    return [] if value is None else [value]


def check_task(task: Any) -> str:
    if task not in TASKS:
        raise EvalConfigError(f"task={task!r}: use task=sampled_sets (FID/KID/CLIP score report) or task=txt2img.")
    return str(task)


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


def check_samplers_fit_process(samplers: Sequence[str], ldm_config: dict[str, Any]) -> None:
    """Samplers written for variance-preserving processes (ddpm, ddim) are refused for a rectified-flow model."""
    kind = (ldm_config.get("process") or {}).get("kind", "vp_discrete")  # v1 artifacts: discrete VP
    try:
        variance_preserving = process_class(kind).variance_preserving
    except ProcessError as err:
        raise EvalConfigError(str(err)) from err
    unfit = [s for s in samplers if s in VP_ONLY_SAMPLERS]
    if unfit and not variance_preserving:
        raise EvalConfigError(f"{', '.join(unfit)}: defined for variance-preserving processes only, and this model's "
                              f"process is '{kind}'. Use euler (DDIM with η=0 on any path) or euler_a (ancestral "
                              "sampling) instead.")


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


def check_seeds(key: str, first: Any, count: int, *, random_allowed: bool = False) -> int:
    """`first` .. `first + count - 1` must be int64 seeds (0 <= seed < 2**63); -1 draws one when allowed."""
    if isinstance(first, bool) or not isinstance(first, int):
        raise EvalConfigError(f"{key} must be a whole number{' (-1: random)' if random_allowed else ''}, got {first!r}.")
    if random_allowed and first == -1:
        return random.SystemRandom().randrange(2**32)
    if first < 0 or first + count - 1 >= SEED_LIMIT:
        raise EvalConfigError(
            f"{key}={first}: sample seeds {key} .. {key}+{count - 1} must lie in [0, 2**63 - 1] (int64, what torch's "
            f"generators and PNG readers take); pass {key}=<0 .. {SEED_LIMIT - count}>"
            + (" or -1 for a random one." if random_allowed else ".")
        )
    return first


def check_output_dir(cfg: DictConfig) -> Path:
    """The run folder (hydra.run.dir / paths.output_dir) must be a folder or not exist yet."""
    out = Path(str(cfg.paths.output_dir)).expanduser()
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise EvalConfigError(
                f"the output folder '{out}' cannot be created: '{parent}' is a file. Point hydra.run.dir (or "
                "paths.output_dir) at a folder, e.g. drop it to get a fresh logs/eval/<task>/runs/<time> folder."
            )
    return out


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
    """One prompt per line (UTF-8 text); blank lines are skipped."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise EvalConfigError(f"prompts_file='{path}' does not exist; pass a text file with one prompt per line.")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EvalConfigError(
            f"prompts_file='{path}' is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): is it a "
            "binary file? Pass a text file with one prompt per line (save it as UTF-8)."
        ) from None
    if "\x00" in text:
        raise EvalConfigError(f"prompts_file='{path}' holds NUL bytes: it is a binary file, not text. Pass a text "
                              "file with one prompt per line.")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise EvalConfigError(f"prompts_file='{path}' holds no prompts (it is empty or blank); write one prompt "
                              "per line, or drop prompts_file to use the dataset's held-out captions.")
    return prompts


def data_identity(cfg: DictConfig, datamodule: Any) -> str:
    """Reference statistics depend on the data config (seed, sizes, probabilities...), not on loader settings."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    content = {k: v for k, v in data.items() if k not in _LOADER_KEYS}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{getattr(datamodule, 'name', type(datamodule).__name__)}-{digest}"
