"""The models of an `eval.py` run: `ckpt=A` (one ldm artifact, as always), `ckpt=[A,B]` or `ckpt={vp: A, flow: B}`
(several, labelled by the mapping's keys or by their run folders' names). Every model draws the same prompts from
the same seeds with every setting; its rows carry its label (`model`), so one report sets e.g. a VP model's
samplers beside a rectified-flow model's, NFE and time included.

Checked here, before any weight is read: each artifact (its config.json, backbone and widths:
`ldmkit.ldm_checks`), that the models sample at one size (the run's height/width, whose latents each backbone must
take), and which samplers each model's process defines. A VP-only sampler (ddpm, ddim) is refused for a single
flow model, as before; with several models it runs on the models it fits and a note says where it did not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from ldmkit.artifacts import ArtifactError
from ldmkit.diffusion.processes import ProcessError, process_class
from ldmkit.diffusion.samplers import VP_ONLY_SAMPLERS
from ldmkit.eval.checks import check_ckpt, check_samplers_fit_process, check_size
from ldmkit.eval.errors import EvalConfigError
from ldmkit.eval.metrics.base import Column
from ldmkit.eval.sampling import Setting, settings_grid

MODEL_COLUMN = Column("model", lambda r: str(r.get("model", "n/a")))  # leads the table when a run has several


@dataclass(frozen=True)
class EvalModel:
    """One ldm artifact of the run and the settings it is drawn with; `label` is None in a one-model run."""

    label: str | None
    path: Path
    config: dict[str, Any]
    settings: tuple[Setting, ...]

    def key(self, setting: Setting) -> tuple[str, int, float]:
        """The report's grid key: (sampler, steps, guidance), the sampler prefixed by the model's label."""
        sampler = setting.sampler if self.label is None else f"{self.label}: {setting.sampler}"
        return (sampler, setting.steps, setting.guidance)


def run_folder_label(path: Any) -> str:
    """A model's default label: the name of its training run folder (…/<run>/artifact -> <run>)."""
    folder = Path(str(path)).expanduser()
    return folder.parent.name if folder.name == "artifact" and folder.parent.name else folder.name


def named_ckpts(ckpt: Any) -> list[tuple[str | None, Any]]:
    """[(label, path)]: one unlabelled entry for `ckpt=PATH`, labelled entries for a list or a mapping."""
    if isinstance(ckpt, (Mapping, DictConfig)):
        entries = [(str(label), path) for label, path in ckpt.items()]
    elif isinstance(ckpt, (list, tuple, ListConfig)):
        labels = [run_folder_label(path) for path in ckpt]
        # two runs' artifacts named alike: number them (label#1, label#2)
        numbered = [f"{label}#{labels[:i + 1].count(label)}" if labels.count(label) > 1 else label
                    for i, label in enumerate(labels)]
        entries = list(zip(numbered, ckpt))
    else:
        return [(None, ckpt)]
    if not entries:
        raise EvalConfigError("ckpt is an empty list; pass ckpt=PATH, ckpt=[PATH_A,PATH_B] or ckpt={vp: PATH_A, flow: PATH_B}.")
    bad = [label for label, _ in entries if not label.strip() or "/" in label]
    if bad:
        raise EvalConfigError(f"model labels {bad} in ckpt: a label names its rows and metrics (label/sampler/steps/"
                              "guidance/metric), so it must be non-empty and hold no '/'; e.g. ckpt={vp: A, flow: B}.")
    return entries


def fits(sampler: str, config: dict[str, Any]) -> bool:
    """Whether `sampler` is defined on the model's noise process (ddpm/ddim: variance-preserving ones only)."""
    kind = (config.get("process") or {}).get("kind", "vp_discrete")  # v1 artifacts: discrete VP
    try:
        return sampler not in VP_ONLY_SAMPLERS or process_class(kind).variance_preserving
    except ProcessError as err:
        raise EvalConfigError(str(err)) from err


def plan_models(ckpt: Any, samplers: Sequence[str], steps: Sequence[int],
                guidance: Sequence[float]) -> tuple[list[EvalModel], list[str]]:
    """The run's models with their settings, and notes on samplers skipped for a model's process."""
    from ldmkit.ldm_checks import check_ldm_config

    models, notes = [], []
    for label, path in named_ckpts(ckpt):
        where = f"ckpt={path}" if label is None else f"ckpt.{label}={path}"
        try:
            folder, config = check_ckpt(path)
        except EvalConfigError as err:
            raise EvalConfigError(f"{err}" if label is None else f"model '{label}': {err}") from err
        try:
            check_ldm_config(folder, config)
        except ArtifactError as err:
            raise EvalConfigError(f"{where}: {err}") from err
        if label is None:
            check_samplers_fit_process(samplers, config)  # one model: a sampler it cannot run is an error
        own = [s for s in samplers if fits(s, config)]
        if len(own) < len(samplers):
            kind = (config.get("process") or {}).get("kind")
            notes.append(f"Model {label}: {', '.join(s for s in samplers if s not in own)} not run (defined for "
                         f"variance-preserving processes only; this model's process is '{kind}').")
        models.append(EvalModel(label, folder, config, tuple(settings_grid(own, steps, guidance))))
    unused = [s for s in samplers if not any(s in {x.sampler for x in m.settings} for m in models)]
    if unused or not all(m.settings for m in models):
        raise EvalConfigError(f"samplers={list(samplers)}: {', '.join(unused) or 'none'} fit(s) none of the models, and "
                              "every model needs a sampler it can run. ddpm/ddim are defined for variance-preserving "
                              "processes only: add euler (DDIM with η=0 on any path) or euler_a.")
    return models, notes


def check_models_size(cfg: DictConfig, models: Sequence[EvalModel]) -> tuple[int, int]:
    """The run's (height, width): each model's training resolution unless set, the same for all models, and a size
    each backbone takes (its latent multiple, the MMDiT position table)."""
    from ldmkit.ldm_checks import build_on_meta, sample_size_problem

    sizes = {m.label: check_size(cfg, m.config) for m in models}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{label}: {h}x{w}" for label, (h, w) in sizes.items())
        raise EvalConfigError(f"the models sample at different sizes by default ({listed}), and one report compares "
                              "them at one size: set height= and width= (e.g. the smaller one).")
    height, width = next(iter(sizes.values()))
    for model in models:
        factor = int(model.config["latent"]["downsampling_factor"])
        try:
            backbone = build_on_meta(model.path, model.config)
        except ArtifactError as err:
            raise EvalConfigError(str(err)) from err
        problem = sample_size_problem(backbone, factor, height, width)
        if problem:
            name = f"ckpt={model.path}" if model.label is None else f"model '{model.label}' ({model.path})"
            raise EvalConfigError(f"height={height}, width={width}: {problem}, for {name}.")
    return height, width


def single_ckpt(ckpt: Any, task: str) -> Any:
    """`ckpt` of a task that takes one model (txt2img), with the fix when it got several."""
    if isinstance(ckpt, (Mapping, DictConfig, list, tuple, ListConfig)):
        raise EvalConfigError(f"task={task} draws from one model, got ckpt={list(ckpt)}: pass ckpt=PATH (sampled sets, "
                              "the default task, compare several models in one report).")
    return ckpt
