"""Write a dataset split as webdataset shards in img2dataset's layout (KEY.png, KEY.txt, KEY.json).

    python -m ldmkit.data.export_shards data=shapes out=DIR [split=train] [num_samples=N]
        [shard_size=1000] [image_format=png] [overwrite=false] [data.resolution=64 ...]

The data config is composed by Hydra from conf/train.yaml, so any override that train.py takes
(``data=digits``, ``data.resolution=64``, ``seed=3``, ``experiment=...``) selects the same data;
the groups that have nothing to do with data (model, trainer, logger, ...) are dropped. The
export options are plain ``key=value`` arguments:

- ``out`` (required): output folder; shards are ``00000.tar``, ``00001.tar``, ..., listed in
  ``export_shards.json``. It must be new, empty, or hold only an earlier export (see overwrite).
- ``split``: train | val | test (default train; augmentation is never applied)
- ``num_samples``: default the whole split (required for endless sources, e.g. resampled shards)
- ``shard_size``: samples per shard (default 1000)
- ``image_format``: png (default, lossless) | jpg | webp
- ``overwrite``: replace an earlier export in ``out`` (default false). Files that export_shards did
  not write (not in ``export_shards.json``) are never replaced or deleted: a folder holding any is
  refused. Every option is checked before anything is read; the shards are written into a
  temporary sibling folder that replaces ``out`` only once complete, so a failed or interrupted
  export leaves ``out`` as it was.

Each sample is ``KEY.png`` + ``KEY.txt`` (caption) + ``KEY.json`` (``key``, ``caption``,
``width``, ``height``, ``status``, ``split``, ``index``, ``attributes``); keys follow img2dataset
(shard number + index in shard). Read the result back with, e.g. (the shell quotes keep Hydra's
quotes, which the braces need)::

    python train.py data=laion_subset 'data.train_shards="DIR/{00000..00009}.tar"'
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from torch.utils.data import Dataset, IterableDataset

from ldmkit.data.images import encode_image

OPTIONS = {"out": None, "split": "train", "num_samples": None, "shard_size": 1000, "image_format": "png", "overwrite": False}
IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "export_shards.json"  # names every file an export wrote: only those are ever replaced
MANIFEST_FORMAT = "ldmkit-export-shards"


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


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
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
            add_member(tar, f"{key}.{image_format}", encode_image(image, image_format))
            add_member(tar, f"{key}.txt", str(sample.get("caption", "")).encode("utf-8"))
            add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
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


def validate_options(options: dict[str, Any]) -> dict[str, Any]:
    """Check every export option before anything is read or written; SystemExit names the fix."""
    def fail(message: str) -> NoReturn:
        raise SystemExit(f"export_shards: {message} (see `python -m ldmkit.data.export_shards --help`)")

    if not options["out"]:
        fail("out=DIR is required")
    if options["split"] not in ("train", "val", "test"):
        fail(f"split must be train, val or test, got {options['split']!r}")
    size, count = options["shard_size"], options["num_samples"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        fail(f"shard_size must be an integer >= 1, got {size!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        fail(f"num_samples must be an integer >= 1 (or left out for the whole split), got {count!r}")
    if options["image_format"] not in IMAGE_FORMATS:
        fail(f"image_format must be one of {IMAGE_FORMATS}, got {options['image_format']!r}")
    if not isinstance(options["overwrite"], bool):
        fail(f"overwrite must be true or false, got {options['overwrite']!r}")
    try:
        check_out(Path(options["out"]), options["overwrite"])
    except ExportError as error:
        fail(str(error))
    return options


class ExportError(ValueError):
    """`out` cannot be written without losing a file export_shards did not write."""


def _manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def check_out(out: Path, overwrite: bool) -> None:
    """`out` must be new, empty, or (with overwrite) hold only what an earlier export wrote."""
    if not out.exists():
        if any(p.exists() and not p.is_dir() for p in out.parents):
            raise ExportError(f"out={out}: a parent of it is a file, not a folder; choose another out=DIR")
        return
    if not out.is_dir():
        raise ExportError(f"out={out} is an existing file, not a folder; choose a folder for the shards (out=DIR)")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    manifest = _manifest(out)
    ours = set(manifest["files"]) | {MANIFEST} if manifest else set()
    foreign = [name for name in present if name not in ours]
    if foreign:
        raise ExportError(
            f"out={out} holds {len(foreign)} file(s) that export_shards did not write (e.g. {foreign[:3]}); "
            "it never replaces or deletes those: choose a new or empty folder, or move them away"
        )
    if not overwrite:
        shards = [name for name in present if name.endswith(".tar")]
        raise ExportError(f"out={out} already holds {len(shards)} exported shard(s); pass overwrite=true to replace them")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished folder `tmp` (checked by `check_out`: nothing foreign is lost)."""
    if not out.exists():
        tmp.rename(out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(backup)
    try:
        tmp.rename(out)
    except BaseException:
        backup.rename(out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def export_dataset(
    dataset: Dataset,
    out: str | Path,
    num_samples: int | None = None,
    shard_size: int = 1000,
    image_format: str = "png",
    split: str = "train",
    overwrite: bool = False,
) -> list[Path]:
    """Write shards into a temporary sibling of `out`, then swap it into place (see `check_out`)."""
    if isinstance(dataset, IterableDataset) and num_samples is None and getattr(dataset, "resampled", False):
        raise ValueError("this split is an endless resampled stream: give num_samples=N")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the shards from other users
    try:
        shards = write_shards(_iter_samples(dataset, num_samples), tmp, shard_size, image_format, split)
        manifest = {
            "format": MANIFEST_FORMAT, "version": 1, "files": [p.name for p in shards], "split": split,
            "shard_size": shard_size, "image_format": image_format, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        check_out(out, overwrite)  # again: something may have appeared while we wrote
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / p.name for p in shards]
