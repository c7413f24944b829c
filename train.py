"""Train one ldmkit stage: `python train.py model=autoencoder|clip|ldm data=shapes|digits|laion_subset|imagefolder`."""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from ldmkit.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    # the value Hydra sweepers (Optuna) optimise
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def renamed_overrides(args: list[str]) -> list[str]:
    """`schedule.KEY=VALUE` -> `process.KEY=VALUE`: the noise-process group was called `schedule` before
    (`schedule=NAME` itself still works through conf/schedule/); old sweeps and scripts keep running."""
    return [re.sub(r"^([+~]{0,2})schedule\.", r"\1process.", a) for a in args]


if __name__ == "__main__":
    sys.argv[1:] = renamed_overrides(sys.argv[1:])
    main()
