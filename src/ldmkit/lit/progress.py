"""`ProgressFile`: the run's training progress in a small JSON file, for a watcher in another process (the
quickstart draws its side-by-side lanes from it; `ldmkit.progress` has the format and the reader)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from ldmkit.progress import write_progress


class ProgressFile(Callback):
    """Writes {step, total, step0, started, time, phase} to `path` (rank 0), at most every `interval` seconds
    while training plus at the start and end of training and of each validation. Cost per batch: one clock read;
    the write (a ~100-byte file, replaced atomically) happens once a second at most."""

    def __init__(self, path: str | Path, interval: float = 1.0) -> None:
        self.path, self.interval = Path(path), float(interval)
        self._started: float | None = None
        self._step0 = 0
        self._last = -math.inf

    def _total(self, trainer: Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        estimate = trainer.estimated_stepping_batches
        return int(estimate) if math.isfinite(estimate) else None

    def _write(self, trainer: Trainer, phase: str) -> None:
        if not trainer.is_global_zero or self._started is None:
            return
        self._last = time.monotonic()
        record: dict[str, Any] = {"step": int(trainer.global_step), "total": self._total(trainer), "step0": self._step0,
                                  "started": self._started, "time": time.time(), "phase": phase}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_progress(self.path, record)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started, self._step0 = time.time(), int(trainer.global_step)  # a resumed run starts past 0
        self._write(trainer, "train")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if time.monotonic() - self._last >= self.interval:
            self._write(trainer, "train")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "validate")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "train")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, "done")
