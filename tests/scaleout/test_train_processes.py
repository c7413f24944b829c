"""The real `train.py` in subprocesses: DDP launched by Lightning under Hydra, signals, kill -9, resume.

Uses the test-only tiny stage (tests/scaleout/tiny.py) so each run costs only the process start-up.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from ldmkit.lit.callbacks import EXIT_PREEMPTED
from tests.scaleout.conftest import TINY, checkpoint_step, run_train, start_train, wait_for
from tests.scaleout.wandb_files import run_summary


def train_in_process(compose_cfg, output_dir: Path, *overrides: str):
    """pipeline.train on the composed config in this process (no interpreter start-up), writing to output_dir."""
    from omegaconf import open_dict

    from ldmkit.pipeline import train

    cfg = compose_cfg(list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return train(cfg)


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted((log_dir / "train" / "tiny" / "runs").iterdir())


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_ddp_sigterm_saves_once_then_resume_continues_same_wandb_run(tmp_path, compose_cfg):
    """trainer=ddp, 2 CPU processes (gloo), bf16-mixed, started by Lightning under Hydra:
    one run folder, one W&B run holding the resolved config; SIGTERM to rank 0 stops both ranks at
    the same step with a last.ckpt; resuming from it reaches max_steps in the same W&B run."""
    log_dir, log = tmp_path / "logs", tmp_path / "first.log"
    common = [*TINY, f"paths.log_dir={log_dir}", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
              "trainer.max_steps=30", "trainer.val_check_interval=10", "callbacks.model_checkpoint.every_n_train_steps=5",
              "callbacks.preemption.sync_every_n_steps=1", "logger=wandb"]
    proc = start_train(*common, "model.step_sleep=0.3", log=log)
    try:
        wait_for(lambda: list(log_dir.glob("train/tiny/runs/*/checkpoints/step_0000005.ckpt")), proc, 400, log, "the first checkpoint")
        os.kill(proc.pid, signal.SIGTERM)  # rank 0 only, as `kill <pid>` would; rank 1 learns it through the all-reduce
        assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-4000:]  # stopped early: 75, not 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (first,) = run_dirs(log_dir)  # rank 1 wrote into rank 0's folder, none of its own
    (wandb_run,) = wandb_runs(first)
    stopped_at = checkpoint_step(first / "checkpoints" / "last.ckpt")
    assert 5 <= stopped_at < 30
    assert not (first / "artifact").exists()  # interrupted: no half-trained artifact
    assert "Received SIGTERM: saving" in log.read_text()
    summary = run_summary(next(wandb_run.glob("run-*.wandb")))
    config = summary["config"]
    assert config["trainer"]["strategy"]["_target_"] == "ldmkit.lit.distributed.HydraDDPStrategy"
    assert config["trainer"]["precision"] == "bf16-mixed" and config["model"]["_target_"] == "tests.scaleout.tiny.TinyModule"
    assert config["paths"]["output_dir"] == str(first)  # resolved, not "${hydra:runtime.output_dir}"
    checkpoint = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(checkpoint["ldmkit"]["rng_states"]) == 2 and checkpoint["ldmkit"]["wandb_run_id"] == summary["run_id"]
    assert not torch.equal(checkpoint["ldmkit"]["rng_states"][0]["torch"], checkpoint["ldmkit"]["rng_states"][1]["torch"])

    # resume in this process (saves an interpreter start) on one process: a different world size is fine too
    second = tmp_path / "resumed"
    train_in_process(compose_cfg, second, *TINY, "trainer.max_steps=30", "callbacks.model_checkpoint.every_n_train_steps=5",
                     "logger=wandb", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    assert checkpoint_step(second / "checkpoints" / "last.ckpt") == 30
    assert (second / "artifact").is_dir()
    (resumed_wandb,) = wandb_runs(second)
    assert run_summary(next(resumed_wandb.glob("run-*.wandb")))["run_id"] == summary["run_id"]


@pytest.mark.slow
def test_kill9_mid_run_then_resume_matches_uninterrupted_run(tmp_path, compose_cfg):
    """kill -9 between checkpoints; resume from last.ckpt: same final step, bit-identical weights, EMA,
    AdamW moments and LR schedule (the reference and the resumed run run in this process)."""
    common = [*TINY, "logger=csv", "trainer.max_steps=20", "trainer.val_check_interval=5",
              "callbacks.model_checkpoint.every_n_train_steps=5"]
    reference = tmp_path / "reference"
    train_in_process(compose_cfg, reference, *common)

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = start_train(*common, f"hydra.run.dir={killed}", "model.step_sleep=0.4", log=log)
    try:
        wait_for(lambda: (killed / "checkpoints" / "step_0000010.ckpt").exists(), proc, 400, log, "step 10's checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = killed / "checkpoints" / "last.ckpt"
    assert 10 <= checkpoint_step(last) < 20

    resumed = tmp_path / "resumed"
    train_in_process(compose_cfg, resumed, *common, f"ckpt_path={last}")
    final = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == expected["global_step"] == 20
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    exp_opt, got_opt = expected["optimizer_states"][0]["state"], final["optimizer_states"][0]["state"]
    assert all(torch.equal(got_opt[i]["exp_avg_sq"], exp_opt[i]["exp_avg_sq"]) for i in exp_opt)
    assert final["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"] == 20


def test_requeued_job_resumes_from_its_own_last_checkpoint(tmp_path, compose_cfg, monkeypatch):
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0) re-runs the same command in the same folder without
    ckpt_path: pipeline.train picks up that folder's last.ckpt by itself (a first attempt starts fresh)."""
    run = tmp_path / "run"
    common = [*TINY, "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.val_check_interval=5"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train_in_process(compose_cfg, run, *common, "trainer.max_steps=5")  # restart count set, nothing saved yet: fresh
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 5
    metrics, objects = train_in_process(compose_cfg, run, *common, "trainer.max_steps=10")
    assert objects["trainer"].global_step == 10 and checkpoint_step(run / "checkpoints" / "last.ckpt") == 10
    assert objects["trainer"].ckpt_path == str(run / "checkpoints" / "last.ckpt")
