"""`ThreadSchedule`: more intra-op CPU threads from a given training step on.

The quickstart trains the autoencoder and the CLIP (+ judge) side by side, one lane per half of the CPU. The CLIP
lane finishes first; from then on half of the machine would idle while the autoencoder lane still runs. This
callback lets the autoencoder take those cores from a fixed step, chosen where the other lane ends on the
machine it was measured on (both lanes slow down or speed up together with the machine, so a step tracks that
moment better than a clock would).

Why a step and not "when the other lane is done": the CPU kernels' results depend, in their last bits, on how many
threads split the work (measured: 1 vs 2 threads differ by ~5e-3 in the weights after 5 autoencoder steps), so a
switch at a moment that depends on timing would make two runs with the same seed differ. A fixed step keeps a run
a pure function of its config and seed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ldmkit.cpus import available_cpus

log = logging.getLogger(__name__)


class ThreadSchedule(Callback):
    """From training step `from_step` on, run with `threads` intra-op threads (`torch.set_num_threads`), capped at
    the CPUs this process may use. `threads=None` or `from_step=None`: do nothing (the config keeps the step, the
    launcher that knows the machine supplies the threads). A resumed run past `from_step` switches at its first step."""

    def __init__(self, from_step: int | None = None, threads: int | None = None) -> None:
        if from_step is not None and (isinstance(from_step, bool) or int(from_step) != from_step or from_step < 0):
            raise ValueError(f"ThreadSchedule: from_step must be a step number >= 0 (or null to turn it off), got "
                             f"{from_step!r}.")
        if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
            raise ValueError(f"ThreadSchedule: threads must be an integer >= 1 (or null to leave the thread count as "
                             f"it is), got {threads!r}.")
        self.from_step = None if from_step is None else int(from_step)
        self.threads = None if threads is None else int(threads)
        self.switched_at: int | None = None

    @property
    def active(self) -> bool:
        return self.from_step is not None and self.threads is not None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.active or self.switched_at is not None or trainer.global_step < self.from_step:
            return
        threads = min(self.threads, available_cpus())
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.switched_at = int(trainer.global_step)
        log.info("ThreadSchedule: step %d: %d -> %d intra-op threads", self.switched_at, before, threads)
