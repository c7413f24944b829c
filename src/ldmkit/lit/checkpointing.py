"""Checkpoint files that survive being killed, and what a resumed run needs to find them again.

- `AtomicCheckpointIO`: every checkpoint is written to a temporary file in the *same folder*,
  fsync'ed, then `os.replace`d over the target, so `last.ckpt` is always either the previous
  complete checkpoint or the new complete one, whatever kills the process (Lightning's default
  serialises into memory and then writes through an fsspec transaction whose temp file lives in
  `/tmp`; across filesystems its final move is a plain copy, which a kill can truncate).
- `AtomicModelCheckpoint`: Lightning's ModelCheckpoint whose `save_last="link"` symlink (or copy)
  is also swapped in atomically (Lightning removes `last.ckpt` before re-creating it).
- `trainer_plugins`: what `pipeline.build` adds to the Trainer (the IO above, SLURM auto-requeue).
- `restart_resume_path`, `wandb_resume_overrides`: resuming after a SLURM requeue or a torchrun
  restart, and continuing the same W&B run.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO

log = logging.getLogger(__name__)

# Where ldmkit keeps its own facts inside a Lightning checkpoint (plain types only: loads with weights_only=True).
CHECKPOINT_KEY = "ldmkit"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems / platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointDiskFullError(OSError):
    """The disk filled up while a checkpoint was written; the previous checkpoint is untouched."""


def temp_path(path: str | os.PathLike) -> Path:
    """`<dir>/.<name>.<host>-<pid>.tmp`: whose temp file it is, so cleanup can tell a dead writer's from a live one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete temp files of `path` left by writers that died mid-save (same host, PID gone); keep live writers'.

    A temp file from another host (shared filesystem) or in an unknown format is never touched.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9_-]+)-)?(?P<pid>\d+)\.tmp")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match is None or match["host"] not in (None, _HOST):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _pid_alive(pid):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


class _WriteRecorder:
    """A file wrapper that remembers the OSError a write raised: torch.save's zip writer swallows it and
    reports only `unexpected pos N vs M`, which hides a full disk."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:  # flush, fileno, ...: the file's own
        return getattr(self.file, name)


def _disk_full(path: Path, err: OSError) -> CheckpointDiskFullError:
    return CheckpointDiskFullError(
        errno.ENOSPC,
        f"No space left on device while saving checkpoint '{path}' ({err}). The previous checkpoint at that path "
        "is intact (the new one was being written to a temporary file, now removed). Free space on that disk, or "
        "write checkpoints elsewhere (paths.log_dir=... or hydra.run.dir=... on a larger disk), then resume with "
        f"ckpt_path={path}",
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes `<dir>/.<name>.<host>-<pid>.tmp`, fsyncs it, then renames it over `<dir>/<name>`.

    Streams straight to disk (no second in-memory copy of the checkpoint). Remote paths (s3://...)
    fall back to Lightning's fsspec transaction, whose object-store upload is already all-or-nothing.
    A full disk raises `CheckpointDiskFullError` saying so (torch alone says `unexpected pos`).
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = fsync

    temp_path = staticmethod(temp_path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)  # left by a process killed mid-save; another live run's are kept
        tmp = self.temp_path(path)
        recorder = None
        try:
            with open(tmp, "wb") as f:
                recorder = _WriteRecorder(f)
                torch.save(checkpoint, recorder)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            cause = recorder.error if recorder is not None and recorder.error is not None else err
            if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
                raise _disk_full(path, cause) from err
            raise
        if self.fsync:
            _fsync_dir(path.parent)  # make the rename itself durable


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point `link` at `target` (relative), replacing whatever `link` was in one rename; copy where symlinks fail."""
    link = Path(link)
    tmp = temp_path(link)
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
    except OSError:  # Windows without the symlink privilege: an atomic copy instead
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `save_last="link"` never leaves a moment without a loadable `last.ckpt`.

    With `save_last=True` last.ckpt is a full save and is already atomic through `AtomicCheckpointIO`;
    with `save_last="link"` Lightning 2.6 deletes last.ckpt and then creates the symlink, so a kill
    in between leaves no last.ckpt. Here the symlink is created under a temp name and renamed over it.
    """

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                import shutil

                shutil.rmtree(linkpath)
            atomic_symlink(filepath, linkpath)
        trainer.strategy.barrier()


def trainer_plugins(user_plugins: Any = None, *, requeue_signal: signal.Signals = signal.SIGUSR1) -> list[Any]:
    """The Trainer's `plugins=`: the user's (already instantiated) plus, where the user gave none of that kind,
    `AtomicCheckpointIO` and, inside a SLURM job step, `SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR1)`.

    The requeue itself is done by `ldmkit.lit.callbacks.PreemptionCheckpoint` (save at a step boundary,
    then `scontrol requeue`), which reads `auto_requeue` and `requeue_signal` from this environment.
    """
    plugins = list(user_plugins) if isinstance(user_plugins, (list, tuple)) else ([user_plugins] if user_plugins else [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if not any(isinstance(p, ClusterEnvironment) for p in plugins) and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=requeue_signal))
    return plugins


def restart_count() -> int:
    """How many times the scheduler has restarted this job: SLURM requeues or torchrun (elastic) restarts."""
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def restart_resume_path(output_dir: str | os.PathLike) -> str | None:
    """This run's `checkpoints/last.ckpt` when the process is a restart of a requeued/restarted job, else None.

    A requeued SLURM job re-runs the same command in the same run folder (submitit keeps the resolved
    `hydra.sweep.dir`; with sbatch pin `hydra.run.dir`), so it must pick up where it stopped even
    though `ckpt_path` was not given on the command line.
    """
    if restart_count() == 0:
        return None
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("Restart %d of this job: resuming from %s", restart_count(), last)
        return str(last)
    return None


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `ldmkit` facts stored in a checkpoint, read through mmap (the tensors are not loaded)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip checkpoint (legacy format): mmap unsupported
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    meta = checkpoint.get(CHECKPOINT_KEY, {}) if isinstance(checkpoint, dict) else {}
    return dict(meta)


def wandb_resume_overrides(logger_cfg: Any, ckpt_path: str | None) -> dict[str, Any]:
    """`{"id": ..., "resume": "allow"}` for `logger.wandb` when `ckpt_path` recorded a W&B run id, so the
    resumed run continues the same W&B run; `{}` when there is nothing to do (no wandb logger, an id
    set explicitly by the user, or a checkpoint written before the id was recorded)."""
    if not ckpt_path or not logger_cfg or "wandb" not in logger_cfg or logger_cfg.wandb.get("id"):
        return {}
    run_id = read_checkpoint_meta(ckpt_path).get("wandb_run_id")
    return {"id": run_id, "resume": "allow"} if run_id else {}
