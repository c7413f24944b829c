"""All ranks of a run must write into one run folder."""

from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer


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
