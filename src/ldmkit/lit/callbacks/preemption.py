"""A clean save when the scheduler says stop: SIGTERM / SIGUSR1 -> `last.ckpt` at the next optimizer-step
boundary, a SLURM requeue, and the exit status `EXIT_PREEMPTED`."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

log = logging.getLogger(__name__)

# Exit status of a run stopped before its end by a signal (preemption, SLURM time limit): EX_TEMPFAIL from
# sysexits.h, "try again later". Non-zero so `train.py ... && train.py ...` stops; last.ckpt holds the resume point.
EXIT_PREEMPTED = 75


def _cluster_environment(trainer: Trainer) -> Any:
    env = getattr(trainer.strategy, "cluster_environment", None)
    return env if env is not None else getattr(trainer._accelerator_connector, "cluster_environment", None)


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this SLURM job (array-aware); True when scontrol accepted it."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("Cannot requeue: SLURM_JOB_ID=%r is not a job id.", job_id)
        return False
    try:
        result = subprocess.call(["scontrol", "requeue", job_id], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("Requeueing SLURM job %s failed (%s); resubmit it with ckpt_path=last.", job_id, err)
        return False
    if result != 0:
        log.warning("`scontrol requeue %s` exited with %d; resubmit it with ckpt_path=last.", job_id, result)
    else:
        log.info("Requeued SLURM job %s.", job_id)
    return result == 0


class PreemptionCheckpoint(Callback):
    """On SIGTERM/SIGUSR1, save `<dirpath>/last.ckpt` at the next optimizer-step boundary and exit.

    The handler only sets a flag (saving inside a signal handler could catch the model mid-update
    or, under DDP, one rank inside a collective); `on_train_batch_end` acts on it. Under DDP the
    ranks agree through one all-reduce every `sync_every_n_steps` optimizer steps (SLURM signals all
    ranks, the local launcher only rank 0; either is enough), so they all save and stop at the same
    step. After the save, rank 0 requeues the job when the signal is the SLURM environment's
    `requeue_signal` with `auto_requeue` (see `ldmkit.lit.checkpointing.trainer_plugins`), and every
    rank raises Lightning's `SIGTERMException(EXIT_PREEMPTED)`: the run ends as interrupted, so `pipeline.train`
    neither exports an artifact nor tests, and the process exits with status 75 (`EXIT_PREEMPTED`).

    The handlers replace Lightning's for the duration of training only (installed in
    `on_train_start`, restored in `on_train_end` / `on_exception`).
    """

    def __init__(
        self,
        signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"),
        dirpath: str | os.PathLike | None = None,
        filename: str = "last.ckpt",
        sync_every_n_steps: int = 10,
        requeue: bool = True,
    ) -> None:
        if sync_every_n_steps < 1:
            raise ValueError(f"PreemptionCheckpoint.sync_every_n_steps must be >= 1, got {sync_every_n_steps}.")
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.dirpath = dirpath
        self.filename = filename
        self.sync_every_n_steps = sync_every_n_steps
        self.requeue = requeue
        self.received: signal.Signals | None = None
        self.saved_path: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._steps = 0
        self._last_step = 0

    # signal handling ------------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:  # keep the first: SLURM may follow USR1 with TERM
            self.received = signal.Signals(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, cannot install signal handlers.")
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _uninstall(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received, self.saved_path, self._steps, self._last_step = None, None, 0, trainer.global_step
        self._install()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._uninstall()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()

    # acting on it ---------------------------------------------------------------------------
    def checkpoint_path(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / self.filename

    def _should_stop(self, trainer: Trainer) -> bool:
        self._steps += 1
        if trainer.world_size == 1:
            return self.received is not None
        if self._steps % self.sync_every_n_steps:
            return False
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # mid gradient accumulation: wait for the optimizer step
            return
        self._last_step = trainer.global_step
        if not self._should_stop(trainer):
            return
        path = self.checkpoint_path(trainer)
        name = self.received.name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"Received {name}: saving {path} at global step {trainer.global_step}, then stopping.")
        for callback in trainer.checkpoint_callbacks:
            # so a resumed ModelCheckpoint overwrites this last.ckpt instead of writing last-v1.ckpt
            if isinstance(callback, ModelCheckpoint) and callback.save_last and Path(callback.dirpath or "") == path.parent:
                callback.last_model_path = str(path)
        trainer.save_checkpoint(path)
        self.saved_path = str(path)
        environment = _cluster_environment(trainer)
        if (
            self.requeue
            and trainer.is_global_zero
            and isinstance(environment, SLURMEnvironment)
            and environment.auto_requeue
            and self.received == environment.requeue_signal
        ):
            requeue_slurm_job()
        raise SIGTERMException(EXIT_PREEMPTED)
