"""The sampled-sets results in the run's loggers: W&B gets the results table and the grids, the other
loggers the scalar metrics (`sampler/steps/guidance/metric`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ldmkit.eval.report import flatten_row, log_report_to_wandb


def scalar_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Flat `sampler/steps/guidance/metric` floats (for loggers and Hydra sweepers); `model/sampler/...` when the
    rows carry a model label (several models in one run)."""
    out: dict[str, float] = {}
    for row in rows:
        prefix = ("" if row.get("model") is None else f"{row['model']}/") + f"{row['sampler']}/{row['steps']}/{row['guidance']:g}"
        for key, value in flatten_row(row).items():
            if key in ("model", "sampler", "steps", "guidance") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and value is not None:
                out[f"{prefix}/{key}"] = float(value)
    return out


def models_name(ckpt: Any) -> str:
    """The evaluated run(s) in a logger run name: the run folder, or the models' labels joined by '-'."""
    if isinstance(ckpt, DictConfig):
        return "-".join(map(str, ckpt))
    if isinstance(ckpt, ListConfig):
        return "-".join(Path(str(path)).parent.name for path in ckpt)
    return Path(str(ckpt)).parent.name


def build_loggers(cfg: DictConfig) -> list:
    """The `logger` group's loggers, named after the evaluated run (the train-run defaults name runs
    after the model group eval lacks)."""
    from lightning.pytorch.loggers import Logger

    from ldmkit.config import instantiate_group

    logger_cfg = cfg.logger.copy()
    defaults = {"name": f"{cfg.get('task_name', 'eval')}-{models_name(cfg.ckpt)}", "group": "eval"}
    with open_dict(logger_cfg):
        for node in logger_cfg.values():
            if isinstance(node, DictConfig):
                raw = OmegaConf.to_container(node, resolve=False)
                for key, default in defaults.items():
                    if key in raw and (raw[key] is None or "choices.model" in str(raw[key])):
                        node[key] = default
    return instantiate_group(logger_cfg, Logger)


def log_to_loggers(cfg: DictConfig, rows: list[dict], grids: dict) -> None:
    """W&B: the results table and grids (`log_report_to_wandb`); other loggers: the scalar metrics."""
    if not cfg.get("logger"):
        return
    from lightning.pytorch.loggers import WandbLogger

    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config.pop("logger", None)
    for logger in build_loggers(cfg):
        logger.log_hyperparams(config)
        if isinstance(logger, WandbLogger):
            log_report_to_wandb(rows, grids, logger.experiment)
        else:
            logger.log_metrics(scalar_metrics(rows))
        logger.finalize("success")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
