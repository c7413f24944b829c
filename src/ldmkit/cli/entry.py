"""What the Hydra entry points share: `python train.py` / `python eval.py` in a checkout and
`python -m ldmkit.cli.train` / `python -m ldmkit.cli.eval` from a wheel differ only in where conf/ is."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def optimized_value(cfg: Mapping[str, Any], metrics: Mapping[str, Any]) -> float | None:
    """The value Hydra sweepers (Optuna) optimise: `metrics[cfg.optimized_metric]`, None when it is not set."""
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def renamed_overrides(args: list[str]) -> list[str]:
    """`schedule.KEY=VALUE` -> `process.KEY=VALUE`: the noise-process group was called `schedule` before
    (`schedule=NAME` itself still works through conf/schedule/); old sweeps and scripts keep running."""
    return [re.sub(r"^([+~]{0,2})schedule\.", r"\1process.", a) for a in args]
