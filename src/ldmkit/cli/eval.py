"""`python -m ldmkit.cli.eval OVERRIDES`: `python eval.py` for an installed ldmkit (configs from
`ldmkit.config.conf_dir()`: the packaged conf/, or `$LDMKIT_CONF`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldmkit.cli.entry import optimized_value
from ldmkit.config import conf_dir
from ldmkit.pipeline import evaluate


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, evaluate(cfg)[0])


if __name__ == "__main__":
    main()
