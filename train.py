"""Train one ldmkit stage: `python train.py model=autoencoder|clip|ldm data=shapes|digits|laion_subset|imagefolder`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ldmkit.cli.entry import optimized_value, renamed_overrides
from ldmkit.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg)[0])


if __name__ == "__main__":
    sys.argv[1:] = renamed_overrides(sys.argv[1:])
    main()
