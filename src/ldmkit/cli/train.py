"""`python -m ldmkit.cli.train OVERRIDES`: `python train.py` for an installed ldmkit (configs from
`ldmkit.config.conf_dir()`: the packaged conf/, or `$LDMKIT_CONF`)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ldmkit.cli.entry import optimized_value, renamed_overrides
from ldmkit.config import conf_dir
from ldmkit.pipeline import train


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg)[0])


if __name__ == "__main__":
    sys.argv[1:] = renamed_overrides(sys.argv[1:])
    main()
