"""Each real stage under `trainer=ddp` with 2 CPU processes (gloo) and bf16-mixed, through `train.py`,
on tiny versions of the stage configs; and the offline (Hydra multirun) noise-schedule sweep on the LDM."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
import torch

from tests.scaleout.conftest import run_train
from tests.scaleout.wandb_files import run_summary

SHAPES = ["data=shapes", "data.batch_size=4", "data.num_workers=0", "data.train_size=64", "data.val_size=8", "data.test_size=8"]
TINY_STAGE = {
    "autoencoder": ["model=autoencoder", "model.autoencoder.config.base_channels=8", "model.latent_stats_batches=1",
                    "model.num_log_images=2"],
    "clip": ["model=clip", "model.net.model_cfg.embed_dim=16", "model.net.model_cfg.vision_cfg.layers=1",
             "model.net.model_cfg.vision_cfg.width=32", "model.net.model_cfg.vision_cfg.head_width=16",
             "model.net.model_cfg.text_cfg.layers=1", "model.net.model_cfg.text_cfg.width=32",
             "model.net.model_cfg.text_cfg.heads=2", "model.scheduler.warmup_steps=1"],
    "ldm": ["model=ldm", "model.val_prompts=[]", "model.lr_warmup_steps=1", "sampler.steps=2"],
}
TRAINER = ["trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
           "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1",
           "callbacks.rich_progress_bar.refresh_rate=0", "logger=csv"]


def stage_overrides(stage: str, artifacts: dict[str, Path]) -> list[str]:
    overrides = SHAPES + TINY_STAGE[stage] + TRAINER
    if stage == "ldm":
        overrides += [f"model.autoencoder={artifacts['autoencoder']}", f"model.text_encoder={artifacts['clip']}"]
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["autoencoder", "clip"])  # ldm: under DDP in the sweep test below
def test_stage_trains_with_ddp_on_two_cpu_processes(tmp_path, tiny_artifacts, stage):
    log_dir = tmp_path / "logs"
    run_train(*stage_overrides(stage, tiny_artifacts), f"paths.log_dir={log_dir}", "trainer=ddp", "trainer.devices=2",
              "trainer.accelerator=cpu", timeout=400)
    (run,) = sorted((log_dir / "train" / stage / "runs").iterdir())  # one run folder for both ranks
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 * len(checkpoint["optimizer_states"])  # manual optimisation: steps per optimizer
    assert len(checkpoint["ldmkit"]["rng_states"]) == 2  # both ranks' RNG states
    assert (run / "artifact" / "config.json").is_file() and (run / "artifact" / "weights.safetensors").is_file()
    assert (run / "csv" / "metrics.csv").is_file() and not list((run / "csv").glob("version_*"))  # one CSV log
    assert "precision: bf16-mixed" in (run / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_offline_noise_schedule_sweep_runs_two_ldm_jobs_with_ddp(tmp_path, tiny_artifacts):
    """`python train.py -m experiment=sweep_noise_schedules ...` narrowed to a 2-point grid on the command line,
    each job the LDM stage under DDP (2 CPU processes, bf16-mixed) with W&B offline. Lightning's launcher alone
    would re-run the whole sweep in every rank-1 process; HydraDDPStrategy starts rank 1 as a plain run of the
    current job, and finish_job lets job 1 start clean (own W&B run, fresh process group, own rank-1 process)."""
    log_dir = tmp_path / "logs"
    proc = run_train(
        "experiment=sweep_noise_schedules", *stage_overrides("ldm", tiny_artifacts), f"paths.log_dir={log_dir}",
        "logger=wandb", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "process=linear,cosine", "process.zero_terminal_snr=true", "model.loss.prediction=v", "model.loss.weighting=min_snr",
        multirun=True, timeout=600,
    )
    (sweep,) = sorted((log_dir / "sweep_noise_schedules" / "ldm" / "multiruns").iterdir())  # no sweep started by a child
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"], proc.stdout[-3000:]
    names, run_ids = set(), set()
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["process"]["zero_terminal_snr"] is True and config["trainer"]["precision"] == "bf16-mixed"
        assert (config["model"]["loss"]["prediction"], config["model"]["loss"]["weighting"]) == ("v", "min_snr")
        names.add(config["process"]["name"])
        checkpoint = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 2 and len(checkpoint["ldmkit"]["rng_states"]) == 2
        assert (job / "artifact" / "weights.safetensors").is_file()
        (wandb_run,) = (job / "wandb").glob("offline-run-*")  # one W&B run per job, none from rank 1
        summary = run_summary(next(wandb_run.glob("run-*.wandb")))
        assert summary["config"]["process"]["name"] == config["process"]["name"]
        values = summary["history"]["val/x0_mse"]
        assert values and all(v == v and v < 1e6 for v in values)  # the sweep objective: logged, finite
        run_ids.add(summary["run_id"])
    assert names == {"linear", "cosine"} and len(run_ids) == 2


def _train_ldm(compose_cfg, tiny_artifacts, output_dir: Path, *overrides: str):
    from omegaconf import open_dict

    from ldmkit.pipeline import train

    cfg = compose_cfg([*stage_overrides("ldm", tiny_artifacts), "trainer.max_steps=8", "trainer.val_check_interval=4",
                       "callbacks.model_checkpoint.every_n_train_steps=4", "model.ema_half_life_images=64", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    train(cfg)
    return torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_ldm_resume_keeps_every_ema_update(tmp_path, compose_cfg, tiny_artifacts):
    """Uninterrupted 8 steps vs 4 steps + resume to 8 on the real LDM stage (in process). Data order after a
    mid-run resume is approximate for the shapes datamodule (see README), so weights are compared loosely;
    the number of EMA updates is exact."""
    reference = _train_ldm(compose_cfg, tiny_artifacts, tmp_path / "reference")
    _train_ldm(compose_cfg, tiny_artifacts, tmp_path / "first", "trainer.max_steps=4")
    resumed = _train_ldm(compose_cfg, tiny_artifacts, tmp_path / "resumed", f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["global_step"] == reference["global_step"] == 8
    ref, res = reference["state_dict"], resumed["state_dict"]
    assert int(res["ema.num_updates"]) == int(ref["ema.num_updates"]) == 8
    shadow = [k for k in ref if k.startswith("ema.shadow.")]
    diff = torch.cat([(res[k] - ref[k]).flatten() for k in shadow]).norm()
    moved = torch.cat([(ref[k] - ref[k.replace("ema.shadow.", "backbone.")]).flatten() for k in shadow]).norm()
    # measured 0.055 vs 0.70: the batches after resuming differ (approximate data position), the EMA state does
    # not; an EMA re-initialised from the live weights at resume would be ~1x `moved` away
    assert diff < 0.25 * moved
