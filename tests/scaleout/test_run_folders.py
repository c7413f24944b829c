"""Nothing lost between runs: unique default run folders, one live run per folder, temp files of live writers
kept, metrics appended across resumes, a distinct exit status when stopped early, and errors that say what happened."""

from __future__ import annotations

import csv
import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from ldmkit.lit import checkpointing
from ldmkit.lit.callbacks import EXIT_PREEMPTED
from ldmkit.lit.checkpointing import AtomicCheckpointIO, CheckpointDiskFullError, remove_stale_temp_files, temp_path
from ldmkit.lit.run_folder import LOCK_NAME, RunFolderBusyError, acquire_run_folder, release_run_folder
from ldmkit.pipeline import ConfigError, validate_checkpoint
from tests.scaleout.conftest import ROOT, TINY, checkpoint_step, start_train, subprocess_env, train_cmd, wait_for
from tests.scaleout.test_train_processes import train_in_process

# ---------------------------------------------------------------------------------- run folders


def test_default_run_folders_differ_for_runs_started_in_the_same_second(compose_with_hydra):
    first, second = compose_with_hydra([]), compose_with_hydra([])
    dirs = [str(cfg.hydra.run.dir) for cfg in (first, second)]
    stamp = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[0-9a-f]{6}"
    assert all(re.fullmatch(rf".*/train/autoencoder/runs/{stamp}", d) for d in dirs), dirs
    assert dirs[0] != dirs[1]
    # one value per composed config: the run folder Hydra creates is the one the lock and the sweep name use
    assert str(first.hydra.run.dir) == dirs[0]
    assert str(first.hydra.sweep.dir).rsplit("_", 1)[1] == dirs[0].rsplit("_", 1)[1]


@pytest.fixture
def compose_with_hydra():
    from ldmkit.config import compose
    from tests.conftest import CONF_DIR

    def _compose(overrides):
        return compose(overrides, "train", config_dir=CONF_DIR, return_hydra_config=True)

    yield _compose


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes `folder`'s lock and keeps it until killed (prints READY once it holds it)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from ldmkit.lit.run_folder import acquire_run_folder
        assert acquire_run_folder({str(folder)!r})
        print("READY", flush=True)
        time.sleep(600)
        """
    )
    env = subprocess_env()
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


def test_second_live_run_in_a_folder_is_refused_and_a_dead_runs_lock_is_free(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderBusyError, match=rf"in use by another live run \(PID {holder.pid} on host .*ckpt_path=last.*hydra.run.dir="):
            acquire_run_folder(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        holder.wait()
    assert acquire_run_folder(tmp_path)  # a resume after a crash is never blocked by a stale lock
    assert not acquire_run_folder(tmp_path)  # re-entrant within one process
    release_run_folder(tmp_path)
    assert (tmp_path / LOCK_NAME).is_file()


def test_other_ranks_do_not_lock(tmp_path, monkeypatch):
    holder = _hold_lock(tmp_path)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # rank 1 of a run writes into rank 0's (locked) folder
        assert acquire_run_folder(tmp_path) is False
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------- temp files


def test_cleanup_removes_only_temp_files_of_dead_writers(tmp_path):
    target = tmp_path / "last.ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = temp_path(target).name.split(".")[-2].rsplit("-", 1)[0]
        files = {
            "dead": tmp_path / f".last.ckpt.{host}-{dead.pid}.tmp",
            "dead_old_format": tmp_path / f".last.ckpt.{dead.pid}.tmp",
            "alive": tmp_path / f".last.ckpt.{host}-{alive.pid}.tmp",  # another run writing right now
            "other_host": tmp_path / f".last.ckpt.otherhost-{dead.pid}.tmp",  # shared filesystem: cannot tell
            "user_file": tmp_path / ".last.ckpt.notes.tmp",
        }
        for path in files.values():
            path.write_bytes(b"partial")
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
        left = {name for name, path in files.items() if path.exists()}
        assert left == {"alive", "other_host", "user_file"}
        assert torch.load(target, weights_only=True)["global_step"] == 1
        assert remove_stale_temp_files(target) == []
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------------- disk full


def test_full_disk_during_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(64, 64)}, path)
    real_open = open

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            if self.written + len(data) > 4096:  # the disk fills up part-way through the new checkpoint
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(checkpointing, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(CheckpointDiskFullError) as info:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(256, 256)}, path)
    message = str(info.value)
    assert "No space left on device" in message and "previous checkpoint" in message and "intact" in message
    assert "unexpected pos" not in message and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temp file is gone


# ---------------------------------------------------------------------------------- refused vs truncated


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_needing_code_is_reported_as_refused_not_truncated(tmp_path):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ConfigError) as info:
        validate_checkpoint(path)
    message = str(info.value)
    assert "refused on purpose" in message and "arbitrary code" in message and "system" in message
    assert "truncated or corrupt" not in message and "killed while saving" not in message
    assert not marker.exists()


def test_truncated_checkpoint_is_reported_as_truncated(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt .*killed while saving"):
        validate_checkpoint(path)


# ---------------------------------------------------------------------------------- csv resume


def _train_loss_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]


def test_resume_with_csv_logger_appends_to_earlier_metrics(tmp_path, compose_cfg):
    run = tmp_path / "run"
    common = [*TINY, "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=10", "trainer.val_check_interval=10"]
    train_in_process(compose_cfg, run, *common, "trainer.max_steps=20")
    assert _train_loss_steps(run) == list(range(20))
    train_in_process(compose_cfg, run, *common, "trainer.max_steps=40", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert _train_loss_steps(run) == list(range(40))  # steps 0..19 kept, 20..39 appended
    with open(run / "csv" / "metrics.csv", newline="") as file:
        assert sum(1 for row in csv.DictReader(file) if row.get("val/loss")) == 4  # validations at 10, 20, 30, 40


# ---------------------------------------------------------------------------------- stopped early


class SignalAt(Callback):
    """Sends this process a signal at a global step (a test stand-in for the scheduler)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


SIGNAL_AT_3 = ["+callbacks.signal_at._target_=tests.scaleout.test_run_folders.SignalAt", "+callbacks.signal_at.step=3"]


@pytest.mark.parametrize("preemption_callback", [True, False], ids=["PreemptionCheckpoint", "lightning-sigterm"])
def test_signal_stops_the_run_with_exit_status_75_and_no_artifact(tmp_path, compose_cfg, preemption_callback):
    run = tmp_path / "run"
    overrides = [*TINY, "logger=csv", "trainer.max_steps=50", *SIGNAL_AT_3]
    if not preemption_callback:  # Lightning's own SIGTERM handling (no checkpoint), e.g. callbacks=none
        overrides.append("~callbacks.preemption")
    with pytest.raises(SystemExit) as info:
        train_in_process(compose_cfg, run, *overrides)
    assert info.value.code == EXIT_PREEMPTED == 75
    assert not (run / "artifact").exists()
    if preemption_callback:
        assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 4
    assert acquire_run_folder(run)  # the lock went with the run
    release_run_folder(run)


# ---------------------------------------------------------------------------------- real processes


@pytest.mark.slow  # two train.py processes
def test_train_py_second_run_in_a_live_folder_refused_then_sigterm_exits_75(tmp_path):
    run, log = tmp_path / "run", tmp_path / "first.log"
    first = start_train(*TINY, f"hydra.run.dir={run}", "logger=csv", "trainer.max_steps=400", "model.step_sleep=0.2",
                        "callbacks.model_checkpoint.every_n_train_steps=2", log=log)
    try:
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), first, 300, log, "the first checkpoint")
        config_before = (run / ".hydra" / "config.yaml").read_text()
        second = subprocess.run(train_cmd(*TINY, f"hydra.run.dir={run}", "seed=7"), cwd=ROOT, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"in use by another live run (PID {first.pid} " in second.stderr
        assert (run / ".hydra" / "config.yaml").read_text() == config_before  # the refused run wrote nothing there
        assert first.poll() is None  # and the first run is unharmed
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-4000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") >= 2 and not (run / "artifact").exists()
    # `a && b` stops at a preempted a
    chained = subprocess.run(["bash", "-c", f"exit {first.returncode} && touch {tmp_path / 'next_stage'}"])
    assert chained.returncode == EXIT_PREEMPTED and not (tmp_path / "next_stage").exists()


@pytest.mark.slow  # two train.py processes at once
def test_train_py_runs_started_together_get_their_own_folders(tmp_path):
    log_dir = tmp_path / "logs"
    common = [*TINY, f"paths.log_dir={log_dir}", "logger=csv", "trainer.max_steps=2"]
    procs = [subprocess.Popen(train_cmd(*common, f"seed={seed}"), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    runs = sorted((log_dir / "train" / "tiny" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "artifact" / "weights.pt").is_file() for r in runs)
    seeds = sorted(OmegaConf.load(r / ".hydra" / "config.yaml").seed for r in runs)
    assert seeds == [1, 2]
