"""conf/process and conf/sampler: every file builds what the diffusion core expects."""

from pathlib import Path

import pytest
import torch

from ldmkit.diffusion import SAMPLERS, Schedule, classifier_free_guidance, sample

CONF = Path(__file__).resolve().parents[2] / "conf"
omegaconf = pytest.importorskip("omegaconf")
hydra_utils = pytest.importorskip("hydra.utils")


VP_PROCESSES = [p for p in sorted((CONF / "process").glob("*.yaml")) if p.stem != "rectified_flow"]


@pytest.mark.parametrize("path", VP_PROCESSES, ids=lambda p: p.stem)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedule_configs_instantiate(path, zero_terminal_snr):
    cfg = omegaconf.OmegaConf.load(path)
    cfg.zero_terminal_snr = zero_terminal_snr  # what `process.zero_terminal_snr=true` does on the command line
    schedule = hydra_utils.instantiate(cfg)
    assert isinstance(schedule, Schedule) and schedule.num_timesteps == 1000
    assert schedule.has_zero_terminal_snr == zero_terminal_snr
    assert cfg.name == path.stem


def test_sampler_configs_cover_the_registry_with_uniform_keys():
    files = sorted((CONF / "sampler").glob("*.yaml"))
    assert {p.stem for p in files} == set(SAMPLERS)
    keys = {tuple(omegaconf.OmegaConf.load(p).keys()) for p in files}
    assert keys == {("name", "steps", "spacing", "eta", "guidance_scale", "guidance_rescale")}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_configs_drive_sample(name):
    cfg = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(CONF / "sampler" / f"{name}.yaml"))
    assert cfg["name"] == name and "_target_" not in cfg
    schedule = hydra_utils.instantiate(omegaconf.OmegaConf.load(CONF / "process" / "scaled_linear.yaml"),
                                       zero_terminal_snr=True)
    net = lambda x, t, c: -x * c  # noqa: E731  (a v-network; any smooth map will do)
    model = classifier_free_guidance(net, torch.ones(2, 1, 1, 1), torch.zeros(1, 1, 1, 1), cfg["guidance_scale"],
                                     rescale=cfg["guidance_rescale"])
    options = {k: v for k, v in cfg.items() if k not in ("name", "steps", "guidance_scale", "guidance_rescale")}
    out = sample(model, torch.randn(2, 3, 4, 4), schedule, cfg["name"], 4, prediction="v",
                 generator=torch.Generator().manual_seed(0), **options)
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
