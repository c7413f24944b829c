"""What a resumed run needs beyond Lightning's own checkpoint: every rank's RNG states (`RNGStateCheckpoint`)
and the W&B run id (`LoggerRunIds`), both kept under `checkpoint["ldmkit"]`."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ldmkit.lit.checkpointing import CHECKPOINT_KEY


def _meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.setdefault(CHECKPOINT_KEY, {})


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
