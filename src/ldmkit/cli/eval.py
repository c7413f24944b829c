"""`python -m ldmkit.cli.eval OVERRIDES`: `python eval.py` for an installed ldmkit (configs from
`ldmkit.config.conf_dir()`: the packaged conf/, or `$LDMKIT_CONF`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldmkit.config import conf_dir
from ldmkit.pipeline import evaluate


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = evaluate(cfg)
    name = cfg.get("optimized_metric")  # the value Hydra sweepers (Optuna) optimise
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
