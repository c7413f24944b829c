"""Process start-up for `python eval.py`: Lightning Fabric starts `devices=N` processes (DDP) or uses the
ones torchrun started; helpers to gather picklable objects and to let rank 0 fill caches first."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")

Gather = Callable[[Any], list[Any]]


def make_fabric(accelerator: str = "auto", devices: int = 1, num_nodes: int = 1):
    from lightning.fabric import Fabric

    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun started the processes: one device per local rank
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
        num_nodes = max(1, int(os.environ.get("WORLD_SIZE", devices)) // devices)
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)


@contextmanager
def launched(fabric) -> Iterator[Any]:
    """`fabric.launch()` (starts ranks 1..N-1 by re-running the command, Hydra-multirun aware), and on
    exit the process group closed and the launcher's environment restored, so a next multirun job starts clean."""
    from lightning.fabric.strategies.launchers import subprocess_script

    from ldmkit.lit.distributed import hydra_job_command

    before = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
    original = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = hydra_job_command
    try:
        fabric.launch()
    finally:
        subprocess_script._hydra_subprocess_cmd = original
    try:
        yield fabric
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_gather(world_size: int) -> Gather | None:
    """all_gather_object over the process group (None for one process)."""
    if world_size == 1:
        return None
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    return gather


def rank_zero_first(rank: int, gather: Gather | None, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 (which fills caches), then on the others; an error on rank 0 stops every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks know
            error = err
    if gather is not None:
        errors = gather(None if error is None else f"{type(error).__name__}: {error}")
        if errors[0] is not None and rank != 0:
            raise RuntimeError(f"rank 0 failed while preparing the evaluation: {errors[0]}")
    if error is not None:
        raise error
    return result if rank == 0 else fn()


def shared_by_rank_zero(gather: Gather | None, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the run folder torchrun-started ranks each composed)."""
    return value if gather is None else gather(value)[0]
