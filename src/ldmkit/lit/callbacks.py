"""Fault-tolerance callbacks: what a resumed run needs beyond Lightning's own checkpoint, a clean save
when the scheduler says stop, and a guard against non-finite steps. All are in `callbacks=default`
through `conf/callbacks/fault_tolerance.yaml`.

- `RNGStateCheckpoint`: every rank's torch/CUDA/numpy/Python RNG states in the checkpoint, restored
  right before the first resumed training step; validation does not advance the training RNG.
- `LoggerRunIds`: the W&B run id in the checkpoint, so `ckpt_path=...` continues the same W&B run.
- `PreemptionCheckpoint`: SIGTERM / SIGUSR1 -> save `last.ckpt` at the next optimizer-step
  boundary, requeue on SLURM, exit.
- `NonFiniteGuard`: a step whose gradients hold NaN/Inf is skipped and counted; too many in a row
  stop the run with a diagnosis.
- `SharedRunDirCheck`: all ranks must write into one run folder.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ldmkit.lit.checkpointing import CHECKPOINT_KEY

log = logging.getLogger(__name__)

# Exit status of a run stopped before its end by a signal (preemption, SLURM time limit): EX_TEMPFAIL from
# sysexits.h, "try again later". Non-zero so `train.py ... && train.py ...` stops; last.ckpt holds the resume point.
EXIT_PREEMPTED = 75


def _meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.setdefault(CHECKPOINT_KEY, {})


# ----------------------------------------------------------------------------------------- RNG


def capture_rng_states() -> dict[str, Any]:
    """This process's global RNG states as plain tensors/ints, so the checkpoint loads with weights_only=True."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]][: torch.cuda.device_count()])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class RNGStateCheckpoint(Callback):
    """Resume with the exact random stream an uninterrupted run would have used.

    Saves all ranks' states (gathered on save, one small collective per checkpoint) and restores
    this rank's so that the next training step draws what it would have drawn uninterrupted:
    at `on_fit_start` (before Lightning builds the dataloader iterator, which draws one seed from the
    global RNG, as the uninterrupted run did when it started the next epoch), and again at the first
    training batch when the checkpoint was taken mid-epoch (the uninterrupted run built no iterator
    there). `isolate_validation` restores the training RNG after every validation run, so whether a
    resumed run repeats a validation or not cannot shift the training noise.
    `per_rank_seed` reseeds rank r with `seed * world_size + r` at fit start: DDP ranks then draw
    different diffusion noise/timesteps instead of identical ones (a single process is unaffected).

    Exact as long as fetching a batch does not consume the main process's global RNG (num_workers > 0,
    or datasets without random augmentation); DataLoader worker RNGs are re-seeded by a new iterator.
    """

    def __init__(self, per_rank_seed: bool = True, isolate_validation: bool = True) -> None:
        self.per_rank_seed = per_rank_seed
        self.isolate_validation = isolate_validation
        self._to_restore: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._to_restore is not None:
            restore_rng_states(self._to_restore)
        elif self.per_rank_seed and trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))
            rank_seed = (seed * trainer.world_size + trainer.global_rank) % 2**32
            torch.manual_seed(rank_seed)
            np.random.seed(rank_seed)
            random.seed(rank_seed)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = capture_rng_states()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        _meta(checkpoint)["rng_states"] = gathered

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get(CHECKPOINT_KEY, {}).get("rng_states")
        if not per_rank:
            rank_zero_warn("The checkpoint holds no RNG states (saved without RNGStateCheckpoint): the resumed run draws new noise.")
            return
        if len(per_rank) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds RNG states of {len(per_rank)} ranks but this run has {trainer.world_size}: "
                "the random stream after resuming differs from the interrupted run's (weights and optimiser are exact)."
            )
            if trainer.global_rank >= len(per_rank):
                return
        self._to_restore = per_rank[trainer.global_rank]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:
            if batch_idx > 0:  # resumed mid-epoch: the uninterrupted run went straight on to this step
                restore_rng_states(self._to_restore)
            self._to_restore = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.isolate_validation and trainer.state.fn == "fit":
            self._before_validation = capture_rng_states()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._before_validation is not None:
            restore_rng_states(self._before_validation)
            self._before_validation = None


# ------------------------------------------------------------------------------------ loggers


class LoggerRunIds(Callback):
    """Record the W&B run id in every checkpoint (`checkpoint["ldmkit"]["wandb_run_id"]`).

    `pipeline.train` reads it back when resuming and passes `id=` and `resume="allow"` to the
    WandbLogger, so the resumed run continues the same W&B run instead of starting a new one.
    """

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger.version:
                _meta(checkpoint)["wandb_run_id"] = str(logger.version)


# --------------------------------------------------------------------------------- preemption


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


# -------------------------------------------------------------------------------- non-finite


def grads_finite(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """One device bool: are all gradients finite? Fused: one `_foreach_norm` per device/dtype, no host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)  # a NaN/Inf anywhere in a tensor makes its norm non-finite
    device = norms[0].device
    return torch.isfinite(torch.stack([n.to(device, torch.float32) for n in norms])).all()


def skip_nonfinite_step(optimizer: torch.optim.Optimizer) -> bool:
    """Drop this step's gradients (set to None) when any is non-finite; True when the step must be skipped.

    torch optimizers skip parameters whose `.grad` is None, so a following `optimizer.step()` changes
    neither the weights nor the moments (Adam's step count included). One host sync.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if bool(grads_finite(params)):
        return False
    optimizer.zero_grad(set_to_none=True)
    return True


def precision_advice(precision: str, gradient_clip_val: float | None = None) -> str:
    """The overflow hint of the NaN guard for the run's actual `trainer.precision`."""
    clip = "" if gradient_clip_val else " or clip gradients with trainer.gradient_clip_val=1.0"
    if precision in ("32-true", "32", "64-true", "64"):
        return (f"exploding activations or gradients (not a low-precision overflow: the run already uses "
                f"precision={precision}{'; clip them with trainer.gradient_clip_val=1.0' if clip else ''})")
    if precision in ("16-mixed", "16"):
        fix = "trainer.precision=bf16-mixed (same range as float32, on GPUs that support it) or 32-true"
    elif precision.startswith("bf16") or precision.startswith("16"):
        fix = "trainer.precision=32-true" + (" or bf16-mixed (float32 weights)" if precision.endswith("-true") else "")
    else:
        fix = "trainer.precision=32-true"
    return f"low-precision overflow (precision={precision}: try {fix}{clip})"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite gradients."""


class NonFiniteGuard(Callback):
    """Skip optimizer steps whose gradients contain NaN/Inf; stop after `max_consecutive` in a row.

    Runs in `on_before_optimizer_step`, which Lightning calls for automatic optimisation and for
    every `opt.step()` of a manual-optimisation module (the autoencoder's generator and
    discriminator steps go through it without any code in the module). A NaN/Inf loss makes every
    gradient NaN, so checking gradients also catches non-finite losses. This is the one host sync per
    optimizer step in training (reading back one bool); under DDP gradients are already all-reduced,
    so all ranks take the same decision without a collective (other strategies reduce it).

    The skipped step still advances the global step and the LR schedule (`train/nonfinite_steps`
    logs the running count). Counters are saved in checkpoints.
    """

    def __init__(self, max_consecutive: int = 20, log_every_skip: bool = True) -> None:
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard.max_consecutive must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.log_every_skip = log_every_skip
        self.skipped = 0
        self.consecutive = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = bool(grads_finite(params))
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)  # sharded grads: agree
        if finite:
            self.consecutive = 0
            return
        diagnosis = self._diagnose(pl_module) if self.consecutive + 1 >= self.max_consecutive else ""
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, rank_zero_only=True)
        if self.log_every_skip:
            rank_zero_warn(f"Non-finite gradients at global step {trainer.global_step}: optimizer step skipped ({self.consecutive} in a row, {self.skipped} in total).")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row had NaN/Inf gradients (the last at global step "
                f"{trainer.global_step}; {self.skipped} skipped in total), so training stopped. {diagnosis}"
                "Likely causes: the learning rate is too high (lower model.optimizer.lr or lengthen the warm-up); "
                f"{precision_advice(str(trainer.precision), trainer.gradient_clip_val)}; "
                "or bad data (NaN/Inf in the inputs of the batches at these steps). "
                "Resume from an earlier checkpoint (ckpt_path=.../step_XXXXXXX.ckpt) after the fix; allow more with "
                "callbacks.nonfinite_guard.max_consecutive=N."
            )

    @staticmethod
    def _diagnose(pl_module: LightningModule) -> str:
        for name, param in pl_module.named_parameters():
            if not torch.isfinite(param).all():
                return f"The weights themselves are already non-finite (first: `{name}`), so skipping steps cannot recover. "
        for name, param in pl_module.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                return f"The first parameter with a non-finite gradient is `{name}`. "
        return ""


# ---------------------------------------------------------------------------------- run dirs


class SharedRunDirCheck(Callback):
    """Fail fast when ranks would write into different run folders.

    With torchrun or `srun python train.py` every rank runs Hydra itself and, with the default
    unique default `hydra.run.dir`, picks its own folder; Lightning's own launcher (trainer.devices=N)
    and the submitit launcher pass one folder to all ranks.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        mine = os.path.abspath(str(trainer.default_root_dir))
        rank0 = trainer.strategy.broadcast(mine, src=0)
        if trainer.strategy.reduce_boolean_decision(mine == rank0, all=True):
            return
        raise RuntimeError(
            f"Rank {trainer.global_rank} writes to '{mine}' but rank 0 to '{rank0}': every process ran Hydra itself "
            "(torchrun / srun) and picked its own unique run folder. Give all ranks the same folder, e.g. "
            "`hydra.run.dir=logs/train/ldm/runs/$SLURM_JOB_ID` (or $TORCHELASTIC_RUN_ID), or let Lightning start the "
            "processes (trainer.devices=N) or use hydra/launcher=slurm."
        )
