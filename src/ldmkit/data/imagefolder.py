"""`imagefolder`: a folder of images (searched recursively) with captions.

Captions: the `captions_csv` row of the file when a CSV is given (columns `file_column`,
`caption_column`; file paths relative to `root`), else a sidecar ``NAME.txt`` next to the image,
else `default_caption`. An image with none of these (or only empty ones) follows
`missing_caption`: ``skip`` (default: left out and counted as ``missing_caption``; images with no
caption source at all are left out once when the dataset is built), ``empty`` (trained on the
caption "", counted as ``kept_without_caption``) or ``error``. A sidecar ``NAME.json`` (a dict)
becomes the sample's attributes.

Symlinked folders are followed, but never in a loop, never twice, and not when they point back
into `root`; a file reached by several paths (links, hard links) is listed once, under its real
path when that lies in `root`.

Splits are decided by a hash of each file's path relative to `root`, so they are disjoint, do not
depend on the training seed, and a file keeps its split when other files are added or removed.

Unreadable or undecodable files are skipped and counted (`ldmkit.data.skips`); the dataset then
serves the next file instead, so the sampler's length stays valid. A broken file is counted each
time its index is requested, i.e. once per epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.images import IMAGE_EXTENSIONS, SkipSample, load_image_tensor
from ldmkit.data.skips import SkipCounter, check_missing_caption_policy, missing_caption_error

MAX_CONSECUTIVE_FAILURES = 50


@dataclass(frozen=True)
class ImageItem:
    path: Path
    relpath: str
    caption: str | None  # None: read the sidecar .txt (or fall back to the default caption) on access
    sidecar_txt: Path | None = None
    sidecar_json: Path | None = None


def path_fraction(relpath: str) -> float:
    """Stable uniform number in [0, 1) for a relative path (decides its split)."""
    digest = hashlib.sha1(relpath.replace(os.sep, "/").encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def read_captions_csv(path: Path, file_column: str = "file", caption_column: str = "caption") -> dict[str, str]:
    """{relative file path: caption} from a CSV with a header row."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if file_column not in columns or caption_column not in columns:
            raise ValueError(
                f"imagefolder: {path} has columns {columns}; need {file_column!r} and {caption_column!r} "
                "(set data.csv_file_column / data.csv_caption_column)"
            )
        return {os.path.normpath(row[file_column]): (row[caption_column] or "").strip() for row in reader}


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of what `path` points to; None when it cannot be reached (dangling link)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _walk(root: Path, not_followed: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under `root`, following symlinked folders at most once.

    A symlinked folder is not followed when it points into `root` (its files are found under their
    real path) or to a folder already walked (a loop, e.g. a link to a parent, or a second link to
    the same place); those are appended to `not_followed`. Hidden folders are skipped.
    """
    root_real = os.path.realpath(root)
    walked = {_identity(str(root))}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(d for d in subfolders if not d.startswith(".")):
            path = os.path.join(folder, name)
            identity = _identity(path)
            inside = os.path.islink(path) and _is_within(os.path.realpath(path), root_real)
            if identity is None or identity in walked or inside:
                not_followed.append(path)
                continue
            walked.add(identity)
            keep.append(name)
        subfolders[:] = keep
        yield folder, files


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _dedupe(items: list[ImageItem], root: Path) -> tuple[list[ImageItem], list[str]]:
    """One item per file (hard links and symlinked files reached twice): the one at the file's real
    path when it lies under `root`, else the first relative path. Returns (items, dropped relpaths)."""
    groups: dict[object, list[ImageItem]] = {}
    for item in items:
        groups.setdefault(_identity(str(item.path)) or item.relpath, []).append(item)
    root_real = os.path.realpath(root)
    kept, dropped = [], []
    for group in groups.values():
        if len(group) > 1:
            real = os.path.relpath(os.path.realpath(group[0].path), root_real)
            group = sorted(group, key=lambda item: (item.relpath != real, item.relpath))
            dropped += [item.relpath for item in group[1:]]
        kept.append(group[0])
    return kept, dropped  # in walk order


def scan_folder(root: Path, captions: dict[str, str] | None = None) -> list[ImageItem]:
    """All images under `root` (recursive, sorted, hidden files skipped) with their caption sources.

    Symlinks are followed without loops, and a file reached by several paths is listed once
    (a warning says what was left out), so no file can land in two splits.
    """
    items, not_followed = [], []
    for folder, files in _walk(Path(root), not_followed):
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(folder) / name
            relpath = os.path.normpath(os.path.relpath(path, root))
            txt, js = f"{stem}.txt", f"{stem}.json"
            items.append(
                ImageItem(
                    path=path,
                    relpath=relpath,
                    caption=None if captions is None else captions.get(relpath),
                    sidecar_txt=Path(folder) / txt if txt in names else None,
                    sidecar_json=Path(folder) / js if js in names else None,
                )
            )
    items, duplicates = _dedupe(items, Path(root))
    if not_followed or duplicates:
        rank_zero_warn(
            f"imagefolder: under {root}, {len(not_followed)} folder link(s) not followed (a loop, a second link to "
            f"the same folder, or a link into the folder itself, e.g. {not_followed[:2]}) and {len(duplicates)} "
            f"file(s) reached by a second path listed once (e.g. {duplicates[:2]})"
        )
    return items


def split_items(items: list[ImageItem], val_fraction: float, test_fraction: float) -> dict[str, list[ImageItem]]:
    """Hash split; a tiny folder still gets one val/test image when its fraction is > 0."""
    ranked = sorted(items, key=lambda item: path_fraction(item.relpath))
    splits: dict[str, list[ImageItem]] = {split: [] for split in SPLITS}
    for item in ranked:
        u = path_fraction(item.relpath)
        split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        splits[split].append(item)
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not splits[split] and len(splits["train"]) >= 2:
            splits[split].append(splits["train"].pop(0))  # lowest hash: still deterministic
    return splits


class ImageFolderDataset(Dataset):
    """Images + captions of one split; unreadable files are counted and replaced by the next one.

    Images without a caption follow `missing_caption` (see the module docstring).
    """

    def __init__(
        self,
        items: list[ImageItem],
        resolution: int,
        *,
        default_caption: str = "",
        min_size: int = 0,
        max_aspect_ratio: float | None = None,
        hflip: bool = False,
        missing_caption: str = "skip",
        skips: SkipCounter | None = None,
    ) -> None:
        if not items:
            raise ValueError("ImageFolderDataset needs at least one image")
        self.resolution = int(resolution)
        self.default_caption = default_caption
        self.min_size, self.max_aspect_ratio, self.hflip = min_size, max_aspect_ratio, hflip
        self.missing_caption = check_missing_caption_policy(missing_caption, "imagefolder")
        self.skips = skips if skips is not None else SkipCounter("imagefolder")
        self.items = self._captioned(list(items))

    def _captioned(self, items: list[ImageItem]) -> list[ImageItem]:
        """Drop (skip) or refuse (error) the images known to have no caption before any is read."""
        if self.missing_caption == "empty" or self.default_caption:
            return items
        without = [item for item in items if not item.caption and item.sidecar_txt is None]
        if without and self.missing_caption == "error":
            raise missing_caption_error("imagefolder", str(without[0].path))
        for item in without:
            self.skips.add("missing_caption", item.relpath, "no NAME.txt, no CSV row, no data.default_caption")
        kept = [item for item in items if item.caption or item.sidecar_txt is not None]
        if not kept:
            raise ValueError(
                f"imagefolder: none of the {len(items)} images (e.g. {items[0].path}) has a caption: add NAME.txt "
                "files or a captions CSV, set data.default_caption=TEXT, or data.missing_caption=empty to train on "
                'them with the caption ""'
            )
        return kept

    def __len__(self) -> int:
        return len(self.items)

    def _caption(self, item: ImageItem) -> str:
        caption = item.caption or ""
        if not caption and item.sidecar_txt is not None:
            try:
                caption = item.sidecar_txt.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                caption = ""  # an unreadable caption file counts as no caption
        caption = caption or self.default_caption
        if not caption and self.missing_caption == "skip":
            raise SkipSample("missing_caption", "empty or unreadable NAME.txt / CSV caption")
        if not caption and self.missing_caption == "error":
            raise missing_caption_error("imagefolder", str(item.path))
        return caption

    @staticmethod
    def _attributes(item: ImageItem) -> dict:
        if item.sidecar_json is None:
            return {}
        try:
            loaded = json.loads(item.sidecar_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(min(MAX_CONSECUTIVE_FAILURES, len(self.items))):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                caption = self._caption(item)
                image = load_image_tensor(str(item.path), self.resolution, self.min_size, self.max_aspect_ratio)
            except SkipSample as skip:
                if attempt == 0:  # a broken neighbour is counted when it is itself requested
                    self.skips.add(skip.reason, item.relpath, skip.detail)
                continue
            if not caption and attempt == 0:
                self.skips.add("kept_without_caption", item.relpath)
            if self.hflip and torch.rand(()) < 0.5:
                image = image.flip(-1)
            return {"image": image, "caption": caption, "attributes": self._attributes(item)}
        raise RuntimeError(
            f"imagefolder: {min(MAX_CONSECUTIVE_FAILURES, len(self.items))} consecutive images from "
            f"{self.items[index % len(self.items)].path} could not be used ({self.skips}); "
            "check the folder's files, their captions (data.missing_caption) and the min_size / max_aspect_ratio filters"
        )


class ImageFolderDataModule(ImageTextDataModule):
    """A folder of images with sidecar .txt captions or a captions CSV (``data=imagefolder``)."""

    name = "imagefolder"
    may_skip = True

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        root: str = "data/images",
        captions_csv: str | None = None,
        csv_file_column: str = "file",
        csv_caption_column: str = "caption",
        default_caption: str = "",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        min_size: int = 0,
        max_aspect_ratio: float | None = None,
        missing_caption: str = "skip",
        **loader_options: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, resolution, seed, **loader_options)
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"imagefolder: need 0 <= val_fraction, test_fraction and val+test < 1, got {val_fraction}, {test_fraction}"
            )
        self.root = Path(root)
        self.captions_csv = captions_csv
        self.csv_columns = (csv_file_column, csv_caption_column)
        self.default_caption = default_caption
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.min_size, self.max_aspect_ratio = min_size, max_aspect_ratio
        self.missing_caption = check_missing_caption_policy(missing_caption, self.name)
        self._splits: dict[str, list[ImageItem]] | None = None

    def _help(self) -> str:
        return (
            f"Put images (*{', *'.join(IMAGE_EXTENSIONS)}) under {self.root} with a NAME.txt caption next to each, "
            f"or a CSV with columns {self.csv_columns[0]},{self.csv_columns[1]} (data.captions_csv=PATH); "
            "set data.root=FOLDER, or train on the embedded dataset with data=shapes."
        )

    def split_items(self) -> dict[str, list[ImageItem]]:
        if self._splits is None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"imagefolder: data.root={str(self.root)!r} is not a folder. {self._help()}")
            captions = None
            if self.captions_csv:
                csv_path = Path(self.captions_csv)
                csv_path = csv_path if csv_path.is_absolute() or csv_path.exists() else self.root / csv_path
                if not csv_path.is_file():
                    raise FileNotFoundError(f"imagefolder: data.captions_csv={self.captions_csv!r} not found")
                captions = read_captions_csv(csv_path, *self.csv_columns)
            items = scan_folder(self.root, captions)
            if not items:
                raise FileNotFoundError(f"imagefolder: no images found under {str(self.root)!r}. {self._help()}")
            if captions is not None:
                listed = {item.relpath for item in items}
                absent = [f for f in captions if f not in listed]
                if absent:
                    rank_zero_warn(f"imagefolder: {len(absent)} CSV rows name files not found under {self.root}, e.g. {absent[0]}")
            self._splits = split_items(items, self.val_fraction, self.test_fraction)
        return self._splits

    def check_source(self) -> None:
        self.split_items()

    def make_dataset(self, split: str, augment: bool = False) -> ImageFolderDataset | None:
        items = self.split_items()[split]
        if not items and split != "train" and getattr(self, f"{split}_fraction") == 0:
            return None  # asked for no val/test data: Lightning then skips that loop
        if not items:
            raise ValueError(
                f"imagefolder: the {split} split of {self.root} is empty ({len(self.split_items()['train'])} train "
                f"images); add images or raise data.{split}_fraction"
            )
        return ImageFolderDataset(
            items, self.resolution, default_caption=self.default_caption, min_size=self.min_size,
            max_aspect_ratio=self.max_aspect_ratio, hflip=augment, missing_caption=self.missing_caption,
            skips=self.skips[split],
        )
