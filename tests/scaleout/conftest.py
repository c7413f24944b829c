from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TEST_CONF = Path(__file__).resolve().parent / "conf"

# `train.py` + the test-only tiny stage (tests/scaleout/tiny.py, conf under tests/scaleout/conf)
TINY = [
    f"hydra.searchpath=[file://{TEST_CONF}]",
    "model=tiny",
    "data=tiny",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "callbacks.rich_progress_bar.refresh_rate=0",
]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    for key in list(env):  # a test run inside a SLURM job / torchrun must not make train.py think it is one
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
            del env[key]
    env.update(extra)
    return env


def train_cmd(*overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), *overrides]


def run_train(*overrides: str, timeout: float = 240, multirun: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python train.py ...` to completion; fail with its output when it fails."""
    proc = subprocess.run(train_cmd(*overrides, multirun=multirun), cwd=ROOT, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"train.py exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start_train(*overrides: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `python train.py ...` in its own process group (so a test can kill it and its DDP children)."""
    return subprocess.Popen(train_cmd(*overrides), cwd=ROOT, env=env or subprocess_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen | None, timeout: float, log: Path | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-5000:] if log else ""
            pytest.fail(f"train.py exited ({proc.returncode}) before {what}\n{tail}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{log.read_text()[-5000:] if log else ''}")


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
