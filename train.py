"""Train one ldmkit stage: `python train.py model=autoencoder|clip|ldm data=shapes|digits|laion_subset|imagefolder`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldmkit.pipeline import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    # the value Hydra sweepers (Optuna) optimise
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
