"""Atomic checkpoint writes, the Trainer plugins pipeline adds, and what a resumed run reads back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from omegaconf import OmegaConf

from ldmkit.lit.checkpointing import (
    CHECKPOINT_KEY,
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    atomic_symlink,
    restart_resume_path,
    trainer_plugins,
    wandb_resume_overrides,
)
from tests.scaleout.conftest import ROOT
from tests.scaleout.tiny import TinyDataModule, TinyModule

SLURM_VARS = {
    "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1",
}


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}


def test_atomic_io_replaces_and_leaves_no_temp_files(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), path)
    io.save_checkpoint(_checkpoint(2), path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_atomic_io_failure_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), path)

    def half_written_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 truncated")  # bytes reach the (temp) file, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint(_checkpoint(2), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow  # a fresh interpreter importing lightning: ~15 s CPU
def test_process_killed_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """The process dies (os._exit, no cleanup) halfway through writing: last.ckpt is the previous one."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from ldmkit.lit.checkpointing import AtomicCheckpointIO
        io, path = AtomicCheckpointIO(), {str(tmp_path / 'last.ckpt')!r}
        io.save_checkpoint({{"global_step": 1, "state_dict": {{"w": torch.ones(512, 512)}}}}, path)
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            f.flush()
            os.ftruncate(f.fileno(), os.fstat(f.fileno()).st_size // 2)  # half of the new file on disk
            os._exit(9)
        torch.save = dying_save
        io.save_checkpoint({{"global_step": 2, "state_dict": {{"w": torch.zeros(512, 512)}}}}, path)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 9, proc.stderr
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1  # the half-written new checkpoint, never renamed into place
    with pytest.raises(Exception):
        torch.load(temps[0], weights_only=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(512, 512))
    AtomicCheckpointIO().save_checkpoint(_checkpoint(3), tmp_path / "last.ckpt")  # next save sweeps the stale temp
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_atomic_symlink_replaces_file_and_link(tmp_path):
    (tmp_path / "step_1.ckpt").write_text("one")
    (tmp_path / "step_2.ckpt").write_text("two")
    (tmp_path / "last.ckpt").write_text("a full copy")
    atomic_symlink(tmp_path / "step_1.ckpt", tmp_path / "last.ckpt")
    assert os.readlink(tmp_path / "last.ckpt") == "step_1.ckpt" and (tmp_path / "last.ckpt").read_text() == "one"
    atomic_symlink(tmp_path / "step_2.ckpt", tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step_1.ckpt", "step_2.ckpt"]


def test_save_last_link_points_at_the_newest_checkpoint(tmp_path):
    checkpoint = AtomicModelCheckpoint(dirpath=tmp_path, filename="step_{step:03d}", save_last="link", save_top_k=-1,
                                       every_n_train_steps=2, auto_insert_metric_name=False)
    trainer = Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[checkpoint], plugins=trainer_plugins(), limit_val_batches=0)
    trainer.fit(TinyModule(), datamodule=TinyDataModule())
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step_006.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_trainer_plugins_default_and_user_choice():
    plugins = trainer_plugins()
    assert [type(p) for p in plugins] == [AtomicCheckpointIO]
    from lightning.pytorch.plugins import TorchCheckpointIO

    mine = TorchCheckpointIO()
    assert trainer_plugins([mine]) == [mine]


def test_slurm_environment_detected_with_auto_requeue(monkeypatch):
    for key, value in SLURM_VARS.items():
        monkeypatch.setenv(key, value)
    plugins = trainer_plugins()
    env = next(p for p in plugins if isinstance(p, SLURMEnvironment))
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, plugins=plugins)
    cluster = trainer._accelerator_connector.cluster_environment
    assert cluster is env and cluster.global_rank() == 0 and cluster.main_port == 15000 + 4242
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_no_slurm_environment_outside_slurm(monkeypatch):
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not any(isinstance(p, SLURMEnvironment) for p in trainer_plugins())


def test_restart_resume_path_only_on_restarts(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert restart_resume_path(tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert restart_resume_path(tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert restart_resume_path(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert restart_resume_path(tmp_path / "elsewhere") is None  # first attempt never saved: start fresh
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_resume_path(tmp_path) is not None


def test_wandb_resume_overrides(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: {"wandb_run_id": "abc123"}}, ckpt)
    logger = OmegaConf.create({"wandb": {"id": None, "offline": True}})
    assert wandb_resume_overrides(logger, str(ckpt)) == {"id": "abc123", "resume": "allow"}
    assert wandb_resume_overrides(logger, None) == {}
    assert wandb_resume_overrides(OmegaConf.create({"csv": {}}), str(ckpt)) == {}
    assert wandb_resume_overrides(OmegaConf.create({"wandb": {"id": "mine"}}), str(ckpt)) == {}
    torch.save({"state_dict": {}}, ckpt)
    assert wandb_resume_overrides(logger, str(ckpt)) == {}
