"""Fault-tolerance callbacks: what a resumed run needs beyond Lightning's own checkpoint, a clean save
when the scheduler says stop, and a guard against non-finite steps. All are in `callbacks=default`
through `conf/callbacks/fault_tolerance.yaml` (which targets the names re-exported here).

- `RNGStateCheckpoint` (resume.py): every rank's torch/CUDA/numpy/Python RNG states in the checkpoint,
  restored right before the first resumed training step; validation does not advance the training RNG.
- `LoggerRunIds` (resume.py): the W&B run id in the checkpoint, so `ckpt_path=...` continues the same W&B run.
- `PreemptionCheckpoint` (preemption.py): SIGTERM / SIGUSR1 -> save `last.ckpt` at the next optimizer-step
  boundary, requeue on SLURM, exit.
- `NonFiniteGuard` (nonfinite.py): a step whose gradients hold NaN/Inf is skipped and counted; too many in
  a row stop the run with a diagnosis.
- `SharedRunDirCheck` (run_dir.py): all ranks must write into one run folder.
"""

from ldmkit.lit.callbacks.nonfinite import (
    NonFiniteGuard,
    NonFiniteTrainingError,
    grads_finite,
    precision_advice,
    skip_nonfinite_step,
)
from ldmkit.lit.callbacks.preemption import EXIT_PREEMPTED, PreemptionCheckpoint, requeue_slurm_job
from ldmkit.lit.callbacks.resume import LoggerRunIds, RNGStateCheckpoint, capture_rng_states, restore_rng_states
from ldmkit.lit.callbacks.run_dir import SharedRunDirCheck

__all__ = [
    "EXIT_PREEMPTED", "LoggerRunIds", "NonFiniteGuard", "NonFiniteTrainingError", "PreemptionCheckpoint",
    "RNGStateCheckpoint", "SharedRunDirCheck", "capture_rng_states", "grads_finite", "precision_advice",
    "requeue_slurm_job", "restore_rng_states", "skip_nonfinite_step",
]
