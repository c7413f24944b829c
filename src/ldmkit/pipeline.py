"""Turn a composed Hydra config into objects, run them, return metrics.

`train.py` and `eval.py` only compose configs; everything they do lives here so that
tests, sweeps and notebooks call the same code (lightning-hydra-template style).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from ldmkit.config import ConfigError, instantiate_group, instantiate_node  # noqa: F401 (re-exported)
from ldmkit.lit.callbacks import EXIT_PREEMPTED
from ldmkit.lit.checkpointing import restart_resume_path, trainer_plugins, wandb_resume_overrides
from ldmkit.lit.distributed import finish_job
from ldmkit.lit.run_folder import acquire_run_folder, release_run_folder

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """`null` → start fresh; `last` → this run's (or the newest sibling run's) last.ckpt; a folder → its last.ckpt.

    The checkpoint is opened with `weights_only=True` here, so a truncated or foreign file fails
    with an actionable message before any model is built on top of it.
    """
    if ckpt_path in (None, "", "null"):
        return None
    output_dir = Path(output_dir)
    if ckpt_path == "last":
        candidates = [output_dir / "checkpoints" / "last.ckpt"]
        runs_dir = output_dir.parent
        if runs_dir.is_dir():
            candidates += sorted(runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(
                f"ckpt_path=last: no last.ckpt in '{output_dir / 'checkpoints'}' nor in any run under '{runs_dir}'. "
                "Start without ckpt_path, or pass ckpt_path=/path/to/run/checkpoints/last.ckpt."
            )
        path = found
    else:
        path = Path(ckpt_path)
        if path.is_dir():
            path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"ckpt_path='{ckpt_path}': no checkpoint file at '{path}'. Pass an existing .ckpt file, a run folder, or ckpt_path=last.")
    validate_checkpoint(path)
    return str(path)


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint with `weights_only=True`, turning corruption into a clear error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err).lower()
        if "weights only load failed" not in message or not ("unsupported" in message or "global" in message):
            raise _unreadable_checkpoint(path, err) from err
        # not damage: the pickle names a class/function, and loading it would run that code
        found = next((line.strip() for line in str(err).splitlines() if "unsupported" in line.lower()), "")
        raise ConfigError(
            f"Checkpoint '{path}' was refused on purpose: loading it would need to run arbitrary code "
            f"(it pickles objects that are not tensors or plain data{': ' + found if found else ''}), and ldmkit only "
            "loads checkpoints with torch.load(weights_only=True). It is not truncated. If you trust where it came from, "
            "re-save it with tensors and plain Python types only; otherwise do not use it. Resume from another "
            "checkpoint (ckpt_path=.../step_XXXXXXX.ckpt) or start fresh without ckpt_path."
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors...
        raise _unreadable_checkpoint(path, err) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"'{path}' is not a Lightning training checkpoint (no 'state_dict'). For stage outputs use the artifact folder instead.")
    return checkpoint


def _unreadable_checkpoint(path: str | os.PathLike, err: BaseException) -> ConfigError:
    return ConfigError(
        f"Checkpoint '{path}' cannot be loaded ({type(err).__name__}: {err}). It is truncated or corrupt "
        "(e.g. the run was killed while saving). Resume from an earlier checkpoint in the same folder "
        "(ckpt_path=.../step_XXXXXXX.ckpt) or start fresh without ckpt_path."
    )


def _log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for logger in loggers:
        logger.log_hyperparams(resolved)


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, callbacks, loggers and trainer from config."""
    seed_everything(cfg.seed, workers=True)
    datamodule: LightningDataModule = instantiate_node(cfg.data)
    model: LightningModule = instantiate_node(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"), Callback)
    loggers = instantiate_group(cfg.get("logger"), Logger)
    if not loggers:  # `logger=none`: Lightning refuses a LearningRateMonitor without a logger; it has nothing to write to
        kept = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if len(kept) < len(callbacks):
            log.info("No logger configured: the learning-rate monitor is left out (it only writes to loggers).")
        callbacks = kept
    # + AtomicCheckpointIO (a kill never corrupts last.ckpt) and, in a SLURM job, SLURMEnvironment(auto_requeue)
    plugins = trainer_plugins(instantiate(cfg.trainer.get("plugins")))
    trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    return {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (and optionally test) the configured stage, export its artifact; return (metrics, objects).

    Holds the run folder's lock throughout (a second live run there is refused). A run stopped before
    the end by a signal (preemption, time limit) raises `SIGTERMException(EXIT_PREEMPTED)`: the process
    exits with status 75, without an artifact, so `train.py ... && train.py ...` stops there.
    """
    locked = acquire_run_folder(cfg.paths.output_dir)
    try:
        return _train(cfg)
    finally:
        if locked:
            release_run_folder(cfg.paths.output_dir)


def _train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    # a requeued SLURM job / restarted torchrun worker continues from this run's last.ckpt unasked
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path") or restart_resume_path(cfg.paths.output_dir), cfg.paths.output_dir)
    if wandb_resume := wandb_resume_overrides(cfg.get("logger"), ckpt_path):  # continue the same W&B run
        with open_dict(cfg):
            cfg.logger.wandb.update(wandb_resume)
    objects = build(cfg)
    model, datamodule, trainer = objects["model"], objects["datamodule"], objects["trainer"]
    _log_config(objects["loggers"], cfg)

    if cfg.get("train", True):
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException as stop:  # PreemptionCheckpoint saved last.ckpt (or Lightning's own SIGTERM handling)
            log.warning("Stopped before the end: no artifact written; exit status %d. Resume with ckpt_path=last "
                        "(or ckpt_path=%s).", EXIT_PREEMPTED, Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
            raise SIGTERMException(EXIT_PREEMPTED) from stop
    metrics = _scalar_metrics(trainer.callback_metrics)

    if cfg.get("export", True) and hasattr(model, "export_artifact") and not trainer.interrupted:
        folder = Path(cfg.paths.output_dir) / "artifact"
        if trainer.is_global_zero:
            objects["artifact"] = model.export_artifact(folder, datamodule=datamodule)
            log.info("Wrote %s artifact to %s", type(model).__name__, folder)
        trainer.strategy.barrier("ldmkit-export")

    if cfg.get("test", False):
        trainer.test(model, datamodule=datamodule, weights_only=True)
        metrics.update(_scalar_metrics(trainer.callback_metrics))
    finish_job()  # close the W&B run and the process group: the next job of a multirun starts clean
    return metrics, objects


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """`eval.py`: sampled sets scored side by side (task=sampled_sets: FID, KID, CLIP score, prompt accuracy,
    NFE, s/image, memory; report.md/html in the run folder) or txt2img PNGs (task=txt2img); (metrics, objects)."""
    from ldmkit.eval.checks import check_task

    if check_task(cfg.get("task", "sampled_sets")) == "txt2img":
        from ldmkit.eval.txt2img_task import run_txt2img

        return run_txt2img(cfg)
    from ldmkit.eval.sampled_sets import run_sampled_sets

    return run_sampled_sets(cfg)
