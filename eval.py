"""Evaluate a trained LDM: `python eval.py ckpt=ARTIFACT samplers=[ddim,dpmpp_2m] steps=[10,20] guidance=[3,5]`,
or draw images: `python eval.py task=txt2img ckpt=ARTIFACT prompt="..."` (see conf/eval.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ldmkit.cli.entry import optimized_value
from ldmkit.pipeline import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, evaluate(cfg)[0])


if __name__ == "__main__":
    main()
