"""DDP that starts its extra processes correctly from inside a Hydra *multirun* job.

Lightning's launcher (`trainer.devices=N`, start_method=popen) re-runs `sys.argv` for ranks 1..N-1
with `hydra.run.dir=<this job's run dir>`. That is right for a single run, but under `-m` the argv
still holds `-m` and the sweep (`process=linear,cosine`), so every child starts a sweep of its
own in a new timestamped folder. `HydraDDPStrategy` builds the child command from the current job
instead: its resolved overrides, no `-m`, `hydra.run.dir=<this job's output dir>`. Outside a
multirun it behaves exactly like `DDPStrategy`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd as _lightning_hydra_cmd
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# hydra overrides that only mean something to the process running the sweep
_SWEEP_ONLY = ("hydra.mode", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper", "hydra.sweep")


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(argv, cwd) that re-creates the current Hydra job as a plain run in the same output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return _lightning_hydra_cmd(local_rank)
    import __main__

    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.lstrip("~+").startswith(_SWEEP_ONLY)]
    command += hydra_overrides + list(hydra_cfg.overrides.task)
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


# Environment variables Lightning's launcher sets in the *launching* process (values before, to restore at
# job end: a LOCAL_RANK left behind makes the next multirun job think its processes are started externally).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_env_before_launch: dict[str, str | None] | None = None


class _HydraJobLauncher(_SubprocessScriptLauncher):
    def _call_children_scripts(self) -> None:
        global _env_before_launch
        if _env_before_launch is None:
            _env_before_launch = {key: os.environ.get(key) for key in _LAUNCHER_ENV}
        original = subprocess_script._hydra_subprocess_cmd
        subprocess_script._hydra_subprocess_cmd = hydra_job_command  # only while this launcher starts its children
        try:
            super()._call_children_scripts()
        finally:
            subprocess_script._hydra_subprocess_cmd = original


class HydraDDPStrategy(DDPStrategy):
    """`DDPStrategy` whose popen launcher is multirun-aware (see module docstring)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


def finish_job() -> None:
    """End what a training job started in this process, so the next job of a multirun starts clean:
    close the W&B run (Lightning's WandbLogger would otherwise attach the next job to it), destroy
    the process group (the next job's DDP would otherwise reuse one whose peers have exited) and
    unset the launcher's LOCAL_RANK/WORLD_SIZE/... (with them the next job would not start its ranks)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    global _env_before_launch
    if _env_before_launch is not None:
        for key, value in _env_before_launch.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _env_before_launch = None
