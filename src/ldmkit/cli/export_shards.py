"""`python -m ldmkit.cli.export_shards` (also `python -m ldmkit.data.export_shards`): a dataset split as
webdataset shards; options and format in `ldmkit.data.export_shards`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ldmkit.config import compose
from ldmkit.data import export_shards
from ldmkit.data.webdataset import shards_hint

DATA_GROUPS = {"data", "paths", "hydra", "experiment", "debug", "_self_"}


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split argv into export options (validated, see `export_shards.validate_options`) and Hydra overrides."""
    options, overrides = dict(export_shards.OPTIONS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in export_shards.OPTIONS:
            options[key] = yaml.safe_load(value) if key != "out" else value
        elif arg in ("-h", "--help"):
            print(export_shards.__doc__)
            raise SystemExit(0)
        else:
            overrides.append(arg)
    return export_shards.validate_options(options), overrides


def compose_data_config(overrides: Sequence[str], config_dir: Path | None = None):
    """Compose conf/train.yaml with `overrides`, dropping the groups unrelated to data."""
    return compose(overrides, "train", config_dir=config_dir, only_groups=DATA_GROUPS)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    from hydra.utils import instantiate

    options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose_data_config(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.hflip = False  # export what the images are, not an augmentation of them
    out = Path(options["out"])
    dataset = datamodule.dataset(options["split"])  # checks the source first (clear error if missing)
    try:
        shards = export_shards.export_dataset(
            dataset, out, options["num_samples"], options["shard_size"], options["image_format"], options["split"],
            overwrite=options["overwrite"],
        )
    except export_shards.ExportError as error:
        raise SystemExit(f"export_shards: {error}") from None
    print(f"wrote {len(shards)} shard(s) to {out}; read them with\n    python train.py {shards_hint(out, len(shards))}")
    return shards



if __name__ == "__main__":
    main()
