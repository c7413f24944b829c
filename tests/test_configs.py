"""Every option of every config group composes and instantiates (DESIGN.md, "Tests")."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from tests.conftest import CONF_DIR
from ldmkit.config import instantiate_group


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ["data", "model", "process", "backbone", "sampler", "callbacks", "logger", "trainer", "paths", "hydra", "debug"]:
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


@pytest.mark.parametrize("name", [n for n in options("process") if n != "rectified_flow"])
def test_process_options_instantiate(compose_cfg, name):
    """Every VP schedule option with zero terminal SNR; rectified_flow has its own tests (tests/test_flow_configs.py)."""
    from ldmkit.diffusion.processes import NoiseProcess

    cfg = compose_cfg([f"process={name}", "process.zero_terminal_snr=true"])
    process = instantiate(cfg.process)
    assert isinstance(process, NoiseProcess)
    assert float(process.alphas_cumprod[-1]) < 1e-6  # rescaled to (numerically) zero terminal SNR


@pytest.mark.parametrize("name", options("schedule"))
def test_former_schedule_group_selects_the_process(compose_cfg, name):
    """`schedule=NAME` (the group's former name) still selects conf/process/NAME.yaml; train.py rewrites
    `schedule.KEY=...` to `process.KEY=...`."""
    import importlib.util

    cfg = compose_cfg([f"schedule={name}"])
    assert cfg.process.name == name and "schedule" not in cfg
    spec = importlib.util.spec_from_file_location("train_entry", CONF_DIR.parent / "train.py")
    train_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_entry)
    assert train_entry.renamed_overrides(["schedule.zero_terminal_snr=true", "+schedule.cosine_s=0.01", "model=ldm"]) == [
        "process.zero_terminal_snr=true", "+process.cosine_s=0.01", "model=ldm"]


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options_build_with_the_artifacts_facts(compose_cfg, name):
    cfg = compose_cfg([f"backbone={name}"])
    factory = instantiate(cfg.backbone)
    with torch.device("meta"):
        backbone = factory(facts={"context_dim": 32, "pooled_dim": 32, "in_channels": 4, "out_channels": 4})
    assert backbone.arch == cfg.backbone.arch and backbone.context_dim == 32 and backbone.in_channels == 4


@pytest.mark.parametrize("name", options("sampler"))
def test_sampler_options_name_registered_samplers(compose_cfg, name):
    from ldmkit.diffusion import SAMPLERS

    cfg = compose_cfg([f"sampler={name}"])
    assert cfg.sampler.name in SAMPLERS
    assert cfg.sampler.steps >= 1


@pytest.mark.parametrize("name", [n for n in options("model") if not n.startswith("ldm")])
def test_stage_model_options_instantiate(compose_cfg, name):
    from lightning.pytorch import LightningModule

    cfg = compose_cfg([f"model={name}"])
    assert isinstance(instantiate(cfg.model), LightningModule)


@pytest.mark.parametrize("name", [n for n in options("model") if n.startswith("ldm")])
def test_ldm_model_options_instantiate(compose_cfg, tiny_artifacts, name):
    """The full module for the tiny preset; for the big presets the UNet factory on the meta device
    (an SD-sized UNet is 3.4 GB of fp32 weights), wired with the artifacts' widths."""
    from ldmkit.lit.ldm import LatentDiffusionModule

    overrides = [f"model={name}", f"model.autoencoder={tiny_artifacts['autoencoder']}", f"model.text_encoder={tiny_artifacts['clip']}"]
    cfg = compose_cfg(overrides)
    if name == "ldm":
        module = instantiate(cfg.model)
        assert isinstance(module, LatentDiffusionModule)
        assert module.backbone.config.context_dim == module.text_encoder.context_dim
        return
    factory = instantiate(cfg.model.backbone)
    with torch.device("meta"):
        unet = factory(facts={"context_dim": 32, "pooled_dim": 32, "in_channels": 4, "out_channels": 4})
    assert sum(p.numel() for p in unet.parameters()) > 10_000_000


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(compose_cfg, name):
    cfg = compose_cfg([f"experiment={name}"])
    assert cfg.trainer.max_steps > 0


def test_logger_none_builds_without_the_learning_rate_monitor(compose_cfg):
    # Lightning raises at fit start for a LearningRateMonitor without a logger (`--logger none` in the quickstart)
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ldmkit.pipeline import build

    cfg = compose_cfg(["experiment=quickstart_clip", "logger=none", "trainer.accelerator=cpu"])
    assert "lr_monitor" in cfg.callbacks
    built = build(cfg)
    assert built["loggers"] == [] and built["trainer"].logger is None
    assert not any(isinstance(c, LearningRateMonitor) for c in built["callbacks"] + built["trainer"].callbacks)
    with_csv = build(compose_cfg(["experiment=quickstart_clip", "logger=csv", "trainer.accelerator=cpu"]))
    assert any(isinstance(c, LearningRateMonitor) for c in with_csv["callbacks"])
