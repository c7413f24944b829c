"""Write a dataset split as webdataset shards in img2dataset's layout (KEY.png, KEY.txt, KEY.json).

    python -m ldmkit.data.export_shards data=shapes out=DIR [split=train] [num_samples=N]
        [shard_size=1000] [image_format=png] [overwrite=false] [data.resolution=64 ...]

The data config is composed by Hydra from conf/train.yaml, so any override that train.py takes
(``data=digits``, ``data.resolution=64``, ``seed=3``, ``experiment=...``) selects the same data;
the groups that have nothing to do with data (model, trainer, logger, ...) are dropped. The
export options are plain ``key=value`` arguments:

- ``out`` (required): output folder; shards are ``00000.tar``, ``00001.tar``, ...
- ``split``: train | val | test (default train; augmentation is never applied)
- ``num_samples``: default the whole split (required for endless sources, e.g. resampled shards)
- ``shard_size``: samples per shard (default 1000)
- ``image_format``: png (default, lossless) | jpg | webp
- ``overwrite``: replace existing ``*.tar`` in ``out`` (default false)

Each sample is ``KEY.png`` + ``KEY.txt`` (caption) + ``KEY.json`` (``key``, ``caption``,
``width``, ``height``, ``status``, ``split``, ``index``, ``attributes``); keys follow img2dataset
(shard number + index in shard). Read the result back with, e.g.,
``data=laion_subset data.train_shards='DIR/{00000..00009}.tar'``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import Dataset, IterableDataset

from ldmkit.data.images import encode_image

OPTIONS = {"out": None, "split": "train", "num_samples": None, "shard_size": 1000, "image_format": "png", "overwrite": False}
_DATA_GROUPS = {"data", "paths", "hydra", "experiment", "debug", "_self_"}


def conf_dir() -> Path:
    """The repo's conf/ folder ($LDMKIT_CONF overrides)."""
    if os.environ.get("LDMKIT_CONF"):
        return Path(os.environ["LDMKIT_CONF"]).resolve()
    for candidate in (Path(__file__).resolve().parents[3] / "conf", Path.cwd() / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError("cannot find conf/train.yaml; run from the repository root or set LDMKIT_CONF=PATH/conf")


def _iter_samples(dataset: Dataset, count: int | None, batch: int = 256) -> Iterator[tuple[int, dict[str, Any]]]:
    if isinstance(dataset, IterableDataset):
        for index, sample in enumerate(dataset):
            if count is not None and index >= count:
                return
            yield index, sample
        return
    total = len(dataset) if count is None else count
    if total > len(dataset):
        raise ValueError(f"num_samples={total} but the split has only {len(dataset)} samples")
    get_many = getattr(dataset, "__getitems__", None)
    for start in range(0, total, batch):
        indices = list(range(start, min(start + batch, total)))
        samples = get_many(indices) if get_many else [dataset[i] for i in indices]
        yield from zip(indices, samples)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[tuple[int, dict[str, Any]]],
    out: str | Path,
    shard_size: int = 1000,
    image_format: str = "png",
    split: str = "train",
) -> list[Path]:
    """Write (index, sample) pairs into ``out/00000.tar`` ... (each written to .tmp, then renamed)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digits = len(str(shard_size - 1))
    written: list[Path] = []
    tar = tmp = None
    count = 0
    try:
        for count, (index, sample) in enumerate(samples, start=1):
            shard, position = divmod(count - 1, shard_size)
            if position == 0:
                if tar is not None:
                    tar.close()
                    tmp.rename(written[-1])
                written.append(out / f"{shard:05d}.tar")
                tmp = written[-1].with_suffix(".tar.tmp")
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            key = f"{shard:05d}{position:0{digits}d}"
            image = sample["image"]  # (3, H, W) in [-1, 1]
            meta = {
                "key": key, "caption": sample.get("caption", ""), "width": int(image.shape[-1]),
                "height": int(image.shape[-2]), "status": "success", "split": split, "index": int(index),
                "attributes": sample.get("attributes", {}),
            }
            _add_member(tar, f"{key}.{image_format}", encode_image(image, image_format))
            _add_member(tar, f"{key}.txt", str(sample.get("caption", "")).encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        if tar is not None:
            tar.close()
            tmp.rename(written[-1])
            tar = None
    finally:
        if tar is not None:  # interrupted: leave no half-written shard behind
            tar.close()
            tmp.unlink(missing_ok=True)
    if count == 0:
        raise ValueError("nothing to export: the split yielded no samples")
    return written


def export_dataset(
    dataset: Dataset,
    out: str | Path,
    num_samples: int | None = None,
    shard_size: int = 1000,
    image_format: str = "png",
    split: str = "train",
) -> list[Path]:
    if isinstance(dataset, IterableDataset) and num_samples is None and getattr(dataset, "resampled", False):
        raise ValueError("this split is an endless resampled stream: give num_samples=N")
    return write_shards(_iter_samples(dataset, num_samples), out, shard_size, image_format, split)


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split argv into export options and Hydra overrides."""
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            options[key] = yaml.safe_load(value) if key != "out" else value
        elif arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        else:
            overrides.append(arg)
    if not options["out"]:
        raise SystemExit("export_shards: out=DIR is required (see `python -m ldmkit.data.export_shards --help`)")
    if options["split"] not in ("train", "val", "test"):
        raise SystemExit(f"export_shards: split must be train, val or test, got {options['split']!r}")
    return options, overrides


def compose_data_config(overrides: Sequence[str], config_dir: Path | None = None):
    """Compose conf/train.yaml with `overrides`, dropping the groups unrelated to data."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    config_dir = config_dir or conf_dir()
    defaults = yaml.safe_load((config_dir / "train.yaml").read_text()).get("defaults", [])
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    drop = [f"~{g}" for g in groups if g not in _DATA_GROUPS and g not in chosen]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        return compose(config_name="train", overrides=[*drop, *overrides])


def main(argv: Sequence[str] | None = None) -> list[Path]:
    from hydra.utils import instantiate

    options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose_data_config(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.hflip = False  # export what the images are, not an augmentation of them
    out = Path(options["out"])
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and not options["overwrite"]:
        raise SystemExit(f"export_shards: {out} already holds {len(existing)} shard(s); pass overwrite=true to replace them")
    for path in existing:
        path.unlink()
    dataset = datamodule.dataset(options["split"])  # checks the source first (clear error if missing)
    shards = export_dataset(
        dataset, out, options["num_samples"], int(options["shard_size"]), options["image_format"], options["split"]
    )
    pattern = f"{out}/{{{0:05d}..{len(shards) - 1:05d}}}.tar" if len(shards) > 1 else str(shards[0])
    print(f"wrote {len(shards)} shard(s) to {out}: read them with data=laion_subset data.train_shards='{pattern}'")
    return shards


if __name__ == "__main__":
    main()
