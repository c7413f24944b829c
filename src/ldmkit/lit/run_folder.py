"""One run, one folder: unique default run folders and a lock held for the life of a run.

- `${run_id:}` (an OmegaConf resolver, registered by ldmkit.config on import, cached per composed config like Hydra's
  `${now:}`): a short random suffix for the default `hydra.run.dir` / `hydra.sweep.dir`, so two runs
  started in the same second get two folders (conf/hydra/default.yaml).
- `acquire_run_folder(folder)`: an exclusive `flock` on `<folder>/.ldmkit.lock`. The kernel releases
  it when the process dies, however it dies (kill -9 included), so a stale lock never blocks a resume.
  A second live run in the same folder is refused with the other run's PID and the fix.
- `RunFolderLock`: a Hydra callback (conf/hydra/default.yaml) that takes the lock before Hydra writes
  anything into the folder (`.hydra/`, the log file); `pipeline.train` takes it too (for runs that do
  not go through `train.py`), a no-op when this process already holds it.

Only the launching process (global rank 0) locks: other ranks of the same run share its folder.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ldmkit.config import register_resolvers

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".ldmkit.lock"
# rank variables of the launchers ldmkit supports: torchrun, Lightning's own, SLURM (srun)
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")

register_resolvers()  # ${run_id:} (ldmkit.config), for train.py, which composes through Hydra itself


class RunFolderBusyError(RuntimeError):
    """Another live process holds this run folder's lock."""


_held: dict[Path, int] = {}  # folder -> fd of its lock file, for this process


def is_launching_process() -> bool:
    """True in the process that owns the run (global rank 0, or no launcher at all)."""
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in _RANK_VARS)


def _holder(lock_file: Path) -> str:
    try:
        fields = lock_file.read_text().split()
    except OSError:
        return "another process"
    if len(fields) >= 2:
        return f"PID {fields[0]} on host {fields[1]}"
    return "another process"


def busy_message(folder: Path, holder: str) -> str:
    return (
        f"Run folder '{folder}' is in use by another live run ({holder}); two runs in one folder would overwrite "
        "each other's checkpoints, metrics and artifact, so this run was refused. Either wait for that run to "
        f"finish (or stop it), then resume it here with ckpt_path=last; or start this run in a folder of its own: "
        "drop hydra.run.dir=... to get a fresh unique folder, or set hydra.run.dir=<another folder>."
    )


def acquire_run_folder(folder: str | os.PathLike) -> bool:
    """Lock `folder` for this process until it exits (or `release_run_folder`); True when this call took it.

    False when this process already holds it, when it is not the launching process, or without `fcntl`.
    Raises `RunFolderBusyError` when another live process holds it.
    """
    folder = Path(folder).resolve()
    if fcntl is None or folder in _held or not is_launching_process():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default: exec'd children don't inherit it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderBusyError(busy_message(folder, _holder(lock_file))) from None
    except OSError as err:  # a filesystem without locks: run unlocked rather than not at all
        os.close(fd)
        log.warning("Cannot lock run folder %s (%s): running without the one-run-per-folder guard.", folder, err)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    _held[folder] = fd
    return True


def release_run_folder(folder: str | os.PathLike) -> None:
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RunFolderLock(Callback):
    """Hydra callback: lock `hydra.run.dir` (single run) or `hydra.sweep.dir` (multirun) before the run writes to it.

    Hydra turns exceptions in callbacks into warnings, so a refusal exits here with the message (status 1).
    """

    def _acquire(self, folder: str) -> None:
        try:
            acquire_run_folder(folder)
        except RunFolderBusyError as err:
            raise SystemExit(f"Error: {err}") from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._acquire(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._acquire(str(config.hydra.sweep.dir))
