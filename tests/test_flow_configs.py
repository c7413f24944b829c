"""The rectified-flow options through the composed Hydra configs: conf/process/rectified_flow with every
timestep sampler and SD3 weighting, the SD3- and Flux-style README commands, and the flow arm of the
noise-process sweep (sweeps/flow_matching.yaml = experiment=sweep_flow_matching, every combination)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from ldmkit.diffusion.flow import RectifiedFlow

ROOT = Path(__file__).resolve().parents[1]
SWEEP = yaml.safe_load((ROOT / "sweeps" / "flow_matching.yaml").read_text())
SD3 = ["process=rectified_flow", "process.shift=3.0", "model.loss.prediction=flow",
       "model.loss.timestep_sampling=logit_normal", "model.loss.weighting=uniform"]
FLUX = ["process=rectified_flow", "process.dynamic_shift=true", "model.loss.prediction=flow",
        "model.loss.timestep_sampling=logit_normal"]


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=["model=ldm", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("style,overrides", [("sd3", SD3), ("flux", FLUX)])
def test_readme_sd3_and_flux_commands_build_the_documented_objective(style, overrides):
    cfg = _compose(overrides)
    process, loss = instantiate(cfg.process), instantiate(cfg.model.loss)
    assert isinstance(process, RectifiedFlow) and loss.process == process and loss.prediction == "flow"
    if style == "sd3":
        assert process.shift == 3.0 and not process.dynamic_shift
    else:  # 32x32 latents at patch 2: 256 tokens, μ = base_shift
        assert process.dynamic_shift and process.for_shape((1, 4, 32, 32)).mu() == pytest.approx(0.5)


@pytest.mark.parametrize("sampling,weighting", itertools.product(["uniform", "logit_normal", "mode"],
                                                                 ["uniform", "sigma_sqrt", "cosmap", "min_snr"]))
def test_every_flow_training_option_instantiates(sampling, weighting):
    cfg = _compose(["process=rectified_flow", "model.loss.prediction=flow",
                    f"model.loss.timestep_sampling={sampling}", f"model.loss.weighting={weighting}"])
    loss = instantiate(cfg.model.loss)
    assert (loss.timestep_sampling, loss.weighting) == (sampling, weighting)


def test_flow_sweep_matches_its_offline_multirun_and_every_combination_composes():
    offline = _compose(["experiment=sweep_flow_matching"])
    grid = {k: str(v).split(",") for k, v in offline.hydra.sweeper.params.items()}
    assert grid == {k: [str(x) for x in p["values"]] for k, p in SWEEP["parameters"].items()}
    assert SWEEP["metric"] == {"name": offline.optimized_metric, "goal": "minimize"}
    assert "experiment=sweep_flow_matching" in SWEEP["command"]
    names = list(SWEEP["parameters"])
    for values in itertools.product(*(SWEEP["parameters"][n]["values"] for n in names)):
        cfg = _compose(["experiment=sweep_flow_matching", *(f"{n}={v}" for n, v in zip(names, values))])
        process, loss = instantiate(cfg.process), instantiate(cfg.model.loss)
        assert isinstance(process, RectifiedFlow) and loss.prediction == "flow"
        assert (process.shift, loss.timestep_sampling, loss.weighting) == values
    vp = _compose(["experiment=sweep_noise_schedules"])
    assert vp.trainer.max_steps == offline.trainer.max_steps and vp.task_name == offline.task_name  # same budget
