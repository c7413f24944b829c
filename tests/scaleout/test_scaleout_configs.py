"""trainer=ddp for every stage, the SLURM launcher, and the noise-schedule sweep compose into valid configs."""

from __future__ import annotations

import itertools
import os
import signal
import stat

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldmkit.lit.callbacks import NonFiniteGuard, PreemptionCheckpoint, RNGStateCheckpoint
from ldmkit.lit.checkpointing import AtomicCheckpointIO, AtomicModelCheckpoint, trainer_plugins
from ldmkit.lit.distributed import HydraDDPStrategy
from ldmkit.config import compose, instantiate_group
from tests.conftest import CONF_DIR, ROOT

STAGES = ["autoencoder", "clip", "ldm"]
SWEEP_FILE = ROOT / "sweeps" / "noise_schedules.yaml"


@pytest.fixture
def compose_with_hydra():
    """Compose conf/train.yaml keeping the `hydra` node (launcher, sweeper)."""

    def _compose(overrides):
        return compose(overrides, "train", config_dir=CONF_DIR, return_hydra_config=True)

    yield _compose


@pytest.mark.parametrize("stage", STAGES)
def test_ddp_trainer_composes_and_instantiates_for_every_stage(compose_cfg, stage):
    cfg = compose_cfg([f"model={stage}", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=3", "trainer.accelerator=cpu"])
    trainer = instantiate(cfg.trainer, logger=False, plugins=trainer_plugins())
    assert isinstance(trainer.strategy, HydraDDPStrategy)
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size) == (2, 3, 6)
    assert trainer.precision == "bf16-mixed"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert OmegaConf.select(cfg, "model._target_").startswith("ldmkit.lit.")


def test_default_callbacks_include_fault_tolerance(compose_cfg):
    cfg = compose_cfg([])
    callbacks = instantiate_group(cfg.callbacks, object)
    kinds = {type(c) for c in callbacks}
    assert {RNGStateCheckpoint, PreemptionCheckpoint, NonFiniteGuard, AtomicModelCheckpoint} <= kinds
    preemption = next(c for c in callbacks if isinstance(c, PreemptionCheckpoint))
    assert preemption.signals == [signal.SIGTERM, signal.SIGUSR1]
    assert str(preemption.dirpath) == cfg.callbacks.model_checkpoint.dirpath  # last.ckpt where ckpt_path=last looks


def test_slurm_launcher_writes_the_expected_sbatch_script(compose_with_hydra, tmp_path, monkeypatch):
    """Through submitit's own sbatch writer: tasks = GPUs per node = trainer.devices, nodes = trainer.num_nodes,
    SIGUSR1 before the time limit (the signal PreemptionCheckpoint saves on), requeue allowed."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_srun = tmp_path / "srun"  # submitit refuses to build a SLURM executor where there is no srun
    fake_srun.write_text("#!/bin/sh\nexit 0\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model=ldm", "trainer=ddp",
                              "trainer.devices=4", "trainer.num_nodes=2", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    # what hydra_submitit_launcher.BaseSubmititLauncher.launch does with them
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout", "_target_")})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    lines = set(script.splitlines())
    for expected in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--signal=USR1@120", "--requeue"]:
        assert f"#SBATCH {expected}" in lines, script
    assert not any("USR2" in line for line in lines)  # submitit's own requeue signal is replaced
    assert any(line.startswith("srun ") for line in lines)  # one task per GPU started by srun


def _sweep() -> dict:
    return yaml.safe_load(SWEEP_FILE.read_text())


def _combinations(parameters: dict) -> list[dict]:
    names = list(parameters)
    return [dict(zip(names, values)) for values in itertools.product(*(parameters[n]["values"] for n in names))]


def test_every_sweep_file_parses():
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert SWEEP_FILE in files
    for path in files:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).is_file()
        assert sweep["method"] in ("grid", "random", "bayes")
        assert sweep["metric"]["goal"] in ("minimize", "maximize") and sweep["metric"]["name"]
        assert "${args_no_hyphens}" in sweep["command"] and "${program}" in sweep["command"]
        assert all("values" in p or "min" in p or "value" in p for p in sweep["parameters"].values())


def test_noise_schedule_sweep_objective_is_logged_by_the_ldm():
    sweep = _sweep()
    assert sweep["metric"] == {"name": "val/x0_mse", "goal": "minimize"}
    assert '"val/x0_mse"' in (ROOT / "src" / "ldmkit" / "lit" / "ldm.py").read_text()
    assert len(_combinations(sweep["parameters"])) == 32


def test_every_noise_schedule_sweep_combination_composes(compose_cfg):
    """Each W&B agent command (values formatted as wandb does: str(True) == 'True') is a valid config whose
    schedule and loss instantiate with the chosen values."""
    sweep = _sweep()
    fixed = [a for a in sweep["command"] if not a.startswith("${")]
    for combination in _combinations(sweep["parameters"]):
        overrides = fixed + [f"{key}={value}" for key, value in combination.items()]
        cfg = compose_cfg(overrides)
        assert cfg.optimized_metric == sweep["metric"]["name"]
        assert OmegaConf.select(cfg, "model._target_") == "ldmkit.lit.ldm.LatentDiffusionModule"
        process, loss = instantiate(cfg.process), instantiate(cfg.model.loss)
        assert cfg.process.name == combination["process"]
        assert process.has_zero_terminal_snr == combination["process.zero_terminal_snr"]
        assert (loss.prediction, loss.weighting) == (combination["model.loss.prediction"], combination["model.loss.weighting"])


def test_offline_sweep_matches_the_wandb_sweep(compose_with_hydra):
    """conf/experiment/sweep_noise_schedules.yaml sweeps exactly the W&B grid with Hydra's basic sweeper."""
    cfg = compose_with_hydra(["experiment=sweep_noise_schedules"])
    offline = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    wandb = {k: [str(x).lower() for x in p["values"]] for k, p in _sweep()["parameters"].items()}
    assert offline == wandb


def test_requeued_submitit_job_keeps_its_run_folder(compose_with_hydra):
    """submitit pickles the job with its config; the timestamp in hydra.sweep.dir is resolved once and cached
    in that config, so the requeued job (unpickled later) writes to, and resumes from, the same folder."""
    import pickle
    import time

    cfg = compose_with_hydra(["hydra/launcher=slurm"])
    first = str(cfg.hydra.sweep.dir)
    blob = pickle.dumps(cfg)
    time.sleep(1.1)
    assert str(pickle.loads(blob).hydra.sweep.dir) == first
    assert str(compose_with_hydra(["hydra/launcher=slurm"]).hydra.sweep.dir) != first  # a new submission: new folder
