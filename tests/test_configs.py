"""Every option of every config group composes and instantiates (DESIGN.md, "Tests")."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from tests.conftest import CONF_DIR
from ldmkit.pipeline import instantiate_group


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ["data", "model", "schedule", "sampler", "callbacks", "logger", "trainer", "paths", "hydra", "debug"]:
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"data={name}"])
    assert isinstance(instantiate(cfg.data), LightningDataModule)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"trainer={name}", "trainer.accelerator=cpu", "logger=none", "callbacks=none"])
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, Trainer)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"callbacks={name}"])
    callbacks = instantiate_group(cfg.callbacks, Callback)
    assert len(callbacks) == len([k for k, v in (cfg.callbacks or {}).items() if isinstance(v, DictConfig)])


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(compose_cfg, name):
    cfg = compose_cfg([f"logger={name}"])
    loggers = instantiate_group(cfg.logger, Logger)
    assert len(loggers) == len(cfg.logger or {})


def test_wandb_is_offline_by_default(compose_cfg):
    cfg = compose_cfg([])
    assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options_compose(compose_cfg, name):
    cfg = compose_cfg([f"debug={name}"])
    assert cfg.data.num_workers == 0
