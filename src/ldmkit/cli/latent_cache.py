"""`python -m ldmkit.cli.latent_cache` (also `python -m ldmkit.data.latent_cache`): encode a dataset once
into a latent / text-embedding cache; options and layout in `ldmkit.data.latent_cache`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ldmkit.config import compose
from ldmkit.data import latent_cache
from ldmkit.data.base import SPLITS


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split argv into cache options and Hydra overrides."""
    options, overrides = dict(latent_cache.OPTIONS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in latent_cache.OPTIONS:
            options[key] = yaml.safe_load(value) if key not in ("out", "device", "dtype") else value
        elif arg in ("-h", "--help"):
            print(latent_cache.__doc__)
            raise SystemExit(0)
        else:
            overrides.append(arg)
    if not options["out"]:
        raise SystemExit(f"latent_cache: out=DIR is required (see `{latent_cache.COMMAND} --help`)")
    if options["split"] not in SPLITS:
        raise SystemExit(f"latent_cache: split must be train, val or test, got {options['split']!r}")
    if options["dtype"] not in latent_cache.DTYPES:
        raise SystemExit(f"latent_cache: dtype must be one of {sorted(latent_cache.DTYPES)}, got {options['dtype']!r}")
    return options, overrides


def compose_config(overrides: Sequence[str], config_dir: Path | None = None):
    """conf/train.yaml with model=ldm (unless another model= is given) and `overrides`, as train.py composes it."""
    return compose(overrides, "train", config_dir=config_dir, fallbacks=["model=ldm"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> Path:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose_config(overrides)
    out = Path(options["out"])
    latent_cache.prepare_out(out, bool(options["overwrite"]))  # before loading anything
    model = cfg.model
    encoders = latent_cache.FrozenEncoders(model.get("autoencoder"), model.get("text_encoder"), int(model.get("clip_skip", 1)),
                              model.get("text_encoder_arch"), _device(options["device"]))
    datamodule = instantiate(cfg.data)
    datamodule.hflip = False  # cache what the images are, not one random augmentation of them
    dataset = datamodule.dataset(options["split"])  # checks the source first (clear error if missing)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    provenance = {"overrides": list(overrides), "options": {k: v for k, v in options.items() if k not in ("out", "overwrite")},
                  "data": data}
    path = latent_cache.build_latent_cache(
        dataset, out, encoders, resolution=int(cfg.data.resolution), split=options["split"],
        num_samples=options["num_samples"], shard_size=int(options["shard_size"]),
        batch_size=int(options["batch_size"] or cfg.data.batch_size), num_workers=int(cfg.data.get("num_workers", 0)),
        dtype=options["dtype"], overwrite=bool(options["overwrite"]), provenance=provenance,
    )
    metadata = latent_cache.read_cache_metadata(path)
    print(f"wrote a latent cache of {metadata['count']} samples in {len(metadata['shards'])} shard(s) to {path}: "
          f"train on it with data=latent_cache data.path={path} data.resolution={metadata['resolution']}")
    return path


if __name__ == "__main__":
    main()
