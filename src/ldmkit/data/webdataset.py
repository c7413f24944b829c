"""`laion_subset`: LAION-style webdataset shards as written by img2dataset.

A shard is a tar of samples ``KEY.jpg|jpeg|png|webp`` (image), ``KEY.txt`` (caption) and
``KEY.json`` (metadata). The caption comes from ``.txt`` (else the json's ``caption``); the batch
``attributes`` are the json's ``attributes`` field when present (as `export_shards` writes), else
the whole json metadata, else ``{}``.

Train: shards are resampled with replacement (`webdataset.ResampledShards`), seeded per
(seed, rank, worker, epoch) so every GPU and worker reads a different stream, shuffled through a
buffer of raw samples and cut into epochs of `samples_per_epoch` samples (over all ranks and
workers). Val/test: a single ordered pass; shards are split across ranks, then workers, and
where there are fewer shards than readers the samples of a shard are split instead, so no sample
is read twice and none is lost (ranks may see unequal counts).

Bad data never stops training: unreadable shards, truncated tars (also those cut inside a header
or between two members, see `ldmkit.data.shard_reader`), undecodable images and samples without an
image are skipped and counted (see `ldmkit.data.skips`), and so are samples removed by the
optional `min_size` / `max_aspect_ratio` filters. Samples without a caption follow
`missing_caption`: ``skip`` (default, counted), ``empty`` (train on "", counted as kept) or
``error``. Only a resampled stream whose every shard fails (or yields no usable sample) stops,
with an error, instead of drawing them forever.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset, get_worker_info

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.images import SkipSample, load_image_tensor
from ldmkit.data.shard_reader import ShardErrors, tar_samples
from ldmkit.data.shapes import sample_keys
from ldmkit.data.skips import SkipCounter, check_missing_caption_policy, missing_caption_error

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Brace-expand a pattern ("dir/{00000..00009}.tar"), a "::"-joined list, or a list of them."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls: list[str] = []
    for item in patterns:
        urls.extend(wds.shardlists.expand_urls(os.path.expanduser(str(item))))
    return urls


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def hydra_override(key: str, value: str) -> str:
    """`key=value` as one shell word that Hydra's override parser reads back as the string `value`.

    A shard pattern needs Hydra quotes (its braces would otherwise parse as a dict: "mismatched
    input '{'") and shell quotes around those (so the shell keeps the Hydra quotes and does not
    brace-expand the pattern itself).
    """
    quote = '"' if '"' not in value else "'"
    # Inside Hydra quotes only the quote is escaped, and the backslashes right before a quote / the end.
    value = re.sub(rf"(\\*)({quote}|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value)
    return shlex.quote(f"{key}={quote}{value}{quote}")


def shards_hint(folder: str | Path, count: int | None = None, option: str = "train_shards") -> str:
    """`data=laion_subset data.OPTION="FOLDER/{00000..0000N}.tar"`, quoted to paste into a shell."""
    pattern = f"{folder}/00000.tar" if count == 1 else f"{folder}/{{00000..{(count or 10) - 1:05d}}}.tar"
    return f"data=laion_subset {hydra_override(f'data.{option}', pattern)}"


def missing_data_message(name: str, option: str, pattern: object, urls: list[str]) -> str:
    example = urls[0] if urls else str(pattern)
    folder = str(Path(example).parent) if urls else "DATA_DIR/laion_subset"
    return (
        f"{name}: no shards found for {option}={pattern!r} (expanded to {len(urls)} path(s), "
        f"first: {example!r}).\n"
        "Download a LAION-style subset with img2dataset (https://github.com/rom1504/img2dataset), e.g.\n"
        f"    img2dataset --url_list laion_part.parquet --input_format parquet --url_col URL --caption_col TEXT \\\n"
        f"        --output_format webdataset --output_folder {folder} --image_size 256 \\\n"
        "        --resize_mode center_crop --processes_count 8 --enable_wandb False\n"
        f"and point data.{option} at the shards it wrote, e.g.\n    python train.py {shards_hint(folder, 10, option)}\n"
        f"or write shards from the embedded dataset with "
        f"`python -m ldmkit.data.export_shards data=shapes {shlex.quote(f'out={folder}')}`, "
        "or train without any download using data=shapes."
    )


def resolve_shards(name: str, option: str, pattern: str | Sequence[str]) -> list[str]:
    """Expanded shard list; local shards must exist (all missing: actionable error; some: warning)."""
    urls = expand_shards(pattern) if pattern else []
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or (local and len(missing) == len(urls)):
        raise FileNotFoundError(missing_data_message(name, option, pattern, urls))
    if missing:
        rank_zero_warn(
            f"{name}: {len(missing)} of {len(urls)} shards of {option} are missing (e.g. {missing[0]}); "
            "using the others"
        )
    return [u for u in urls if u not in set(missing)]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike hash() of strings)."""
    key = int(sample_keys(values[0], "train", [0])[0])
    for value in values[1:]:
        key = int(sample_keys(key ^ (value & ((1 << 64) - 1)), "train", [0])[0])
    return key >> 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def decode_shard_sample(
    raw: dict[str, Any], resolution: int, min_size: int = 0, max_aspect_ratio: float | None = None,
    missing_caption: str = "skip",
) -> dict[str, Any]:
    """Raw tar sample {"__key__", "jpg", "txt", "json", ...} -> batch sample, or raise SkipSample
    (MissingCaptionError for a sample without caption under ``missing_caption="error"``)."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise SkipSample("missing_image", f"members {members}, need one of {IMAGE_KEYS}")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            loaded = json.loads(raw["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}  # metadata is optional: a broken json costs the attributes, not the sample
    caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
    caption = caption or str(meta.get("caption") or "").strip()  # an empty .txt falls back to the json
    if not caption and missing_caption != "empty":
        if missing_caption == "error":
            raise missing_caption_error("laion_subset", f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}")
        raise SkipSample("missing_caption", "no .txt member and no caption in the .json (or they are empty)")
    image = load_image_tensor(raw[image_key], resolution, min_size, max_aspect_ratio)
    attributes = meta["attributes"] if isinstance(meta.get("attributes"), dict) else meta
    return {"image": image, "caption": caption, "attributes": attributes}


class WebDatasetSamples(IterableDataset):
    """Decoded samples from webdataset shards for one split (see the module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        resolution: int,
        *,
        seed: int = 0,
        resampled: bool = False,
        shuffle_buffer: int = 0,
        samples_per_epoch: int | None = None,
        min_size: int = 0,
        max_aspect_ratio: float | None = None,
        hflip: bool = False,
        missing_caption: str = "skip",
        skips: SkipCounter | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("WebDatasetSamples needs at least one shard url")
        self.urls = list(urls)
        self.resolution, self.seed = int(resolution), int(seed)
        self.resampled, self.shuffle_buffer = resampled, int(shuffle_buffer)
        self.samples_per_epoch = samples_per_epoch
        self.min_size, self.max_aspect_ratio, self.hflip = int(min_size), max_aspect_ratio, hflip
        self.missing_caption = check_missing_caption_policy(missing_caption, "webdataset")
        self.skips = skips if skips is not None else SkipCounter("webdataset")
        self.epoch = 0
        self._rank_world: tuple[int, int] | None = None
        self._position: dict[str, Any] | None = None  # see state_dict

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Rank and world size, captured in the main process (workers cannot see the process group)."""
        self._rank_world = (int(rank), int(world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_world(self) -> tuple[int, int]:
        if self._rank_world is not None:
            return self._rank_world
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return rank, world

    def _assignment(self, rank: int, world: int, worker: int, workers: int, epoch: int) -> tuple[list[str], int, int]:
        """Shards this reader opens, plus (stride, offset) of the samples it keeps from them."""
        shards = list(self.urls)
        if self.shuffle_buffer > 1:  # same order on every rank and worker, so the split stays disjoint
            random.Random(mix_seed(self.seed, epoch)).shuffle(shards)
        stride, offset = 1, 0
        if len(shards) >= world:
            shards = shards[rank::world]
        else:
            stride, offset = world, rank
        if len(shards) >= workers:
            shards = shards[worker::workers]
        else:
            stride, offset = stride * workers, offset + stride * worker
        return shards, stride, offset

    def _shard_at(self, rank: int, world: int, worker: int, workers: int, epoch: int) -> tuple[Callable[[int], str | None], int, int]:
        """The reader's i-th shard (None past the end), plus (stride, offset) of the samples it keeps.
        Resampled: shard i is drawn from (seed, rank, worker, epoch, i) alone, so any position is
        reached without drawing the shards before it."""
        if self.resampled:
            urls = self.urls
            return (lambda i: urls[random.Random(mix_seed(self.seed, rank, worker, epoch, i)).randrange(len(urls))]), 1, 0
        shards, stride, offset = self._assignment(rank, world, worker, workers, epoch)
        return (lambda i: shards[i] if i < len(shards) else None), stride, offset

    def _raw_from(self, shard_at: Callable[[int], str | None], start: Sequence[int], stride: int, offset: int,
                  errors: ShardErrors) -> Iterator[tuple[list[int], dict]]:
        """(position after it, raw sample) from raw position `start` = [shard index, sample index in the
        shard, samples before it in the reader's shards]. Samples of the start shard before the start
        are read (a tar is a stream), not decoded."""
        expand = partial(tar_samples, handler=errors.handler)
        shard, member, count = start
        while (url := shard_at(shard)) is not None:
            for index, raw in enumerate(expand(errors.track([{"url": url}]))):
                if index < member:
                    continue
                count += 1
                if (count - 1) % stride == offset:
                    yield [shard, index + 1, count], raw
            shard, member = shard + 1, 0

    def _windows(self, reader: tuple[int, ...], position: dict[str, Any], shard_at, stride: int, offset: int,
                 errors: ShardErrors) -> Iterator[tuple[dict[str, Any], dict, bool]]:
        """(position after it, raw sample, flip) in shuffled windows of `shuffle_buffer` raw samples.

        A window's order and flips are drawn from (seed, reader, window index), so the stream is a
        function of the position {"window", "start" (raw position of the window), "taken"}: a resumed
        reader re-reads the window it was in (undecoded) and goes on from the next sample."""
        window, start, taken = position["window"], position["start"], position["taken"]
        raw = self._raw_from(shard_at, start, stride, offset, errors)
        size = max(1, self.shuffle_buffer)
        while items := list(islice(raw, size)):
            rng = random.Random(mix_seed(self.seed, *reader, window, 1))
            order = list(range(len(items)))
            if size > 1:
                rng.shuffle(order)
            flips = [self.hflip and rng.random() < 0.5 for _ in items]
            for k in range(taken, len(items)):
                yield {"window": window, "start": start, "taken": k + 1}, items[order[k]][1], flips[k]
            window, start, taken = window + 1, items[-1][0], 0

    def state_dict(self) -> dict[str, Any]:
        """This reader's stream position (StatefulDataLoader saves it from every worker with each batch)."""
        return dict(self._position) if self._position is not None else {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position = dict(state)
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self.rank_world()
        worker, workers = _worker()
        position = self._position if self._position is not None and "window" in self._position else None
        epoch = self.epoch if position is None else int(position["epoch"])
        self.epoch = epoch + 1  # persistent workers / the main process see a new stream every epoch
        position = position or {"epoch": epoch, "emitted": 0, "window": 0, "start": [0, 0, 0], "taken": 0}
        emitted = int(position["emitted"])
        limit = math.ceil(self.samples_per_epoch / (world * workers)) if self.resampled and self.samples_per_epoch else None
        errors = ShardErrors(self.skips, self.urls if self.resampled else None, self.skips.name)
        shard_at, stride, offset = self._shard_at(rank, world, worker, workers, epoch)
        stream = self._windows((rank, worker, epoch), position, shard_at, stride, offset, errors)
        try:
            while limit is None or emitted < limit:
                try:
                    where, raw, flip = next(stream)
                except StopIteration:
                    break
                self._position = {"epoch": epoch, "emitted": emitted, **where}
                for sample in errors.watch(self._decode(iter([raw]))):
                    emitted += 1
                    self._position["emitted"] = emitted
                    if flip:
                        sample["image"] = sample["image"].flip(-1)
                    yield sample
        finally:
            errors.flush()
        self._position = {"epoch": epoch + 1}

    def _decode(self, samples: Iterator[dict]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            key = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
            try:
                sample = decode_shard_sample(
                    raw, self.resolution, self.min_size, self.max_aspect_ratio, self.missing_caption
                )
            except SkipSample as skip:
                self.skips.add(skip.reason, key, skip.detail)
                continue
            if not sample["caption"]:
                self.skips.add("kept_without_caption", key)
            yield sample


class WebDatasetDataModule(ImageTextDataModule):
    """LAION-style webdataset shards (``data=laion_subset``).

    `train_shards`: brace pattern / list of shards. `val_shards`: its own pattern, or None to hold
    out the last train shard. `test_shards`: None means the val shards. Paths are checked in
    `setup()` (construction never touches the disk), with an error that says how to get data.
    """

    name = "laion_subset"
    may_skip = True

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        train_shards: str | Sequence[str] = "data/laion_subset/{00000..00009}.tar",
        val_shards: str | Sequence[str] | None = None,
        test_shards: str | Sequence[str] | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = 10_000,
        min_size: int = 0,
        max_aspect_ratio: float | None = None,
        missing_caption: str = "skip",
        **loader_options: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, resolution, seed, **loader_options)
        if max_aspect_ratio is not None and max_aspect_ratio < 1:
            raise ValueError(f"{self.name}: max_aspect_ratio is long/short side, >= 1 or null; got {max_aspect_ratio}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"{self.name}: samples_per_epoch must be >= 1 or null, got {samples_per_epoch}")
        self.patterns = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.resampled, self.shuffle_buffer, self.samples_per_epoch = resampled, shuffle_buffer, samples_per_epoch
        self.min_size, self.max_aspect_ratio = min_size, max_aspect_ratio
        self.missing_caption = check_missing_caption_policy(missing_caption, self.name)
        self._urls: dict[str, list[str]] | None = None

    def shard_urls(self) -> dict[str, list[str]]:
        """Shards of each split (raises the missing-data error)."""
        if self._urls is None:
            train = resolve_shards(self.name, "train_shards", self.patterns["train"])
            if self.patterns["val"]:
                val = resolve_shards(self.name, "val_shards", self.patterns["val"])
            elif len(train) >= 2:
                train, val = train[:-1], train[-1:]  # hold out the last shard
            else:
                raise ValueError(
                    f"{self.name}: train_shards={self.patterns['train']!r} is a single shard, so none can be held "
                    "out for validation; set data.val_shards=PATTERN (or give more train shards)"
                )
            test = resolve_shards(self.name, "test_shards", self.patterns["test"]) if self.patterns["test"] else val
            self._urls = {"train": train, "val": val, "test": test}
        return self._urls

    def check_source(self) -> None:
        self.shard_urls()

    def make_dataset(self, split: str, augment: bool = False) -> WebDatasetSamples:
        train = split == "train"
        return WebDatasetSamples(
            self.shard_urls()[split],
            self.resolution,
            seed=self.seed + SPLITS.index(split),
            resampled=self.resampled and train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            samples_per_epoch=self.samples_per_epoch if train else None,
            min_size=self.min_size,
            max_aspect_ratio=self.max_aspect_ratio,
            hflip=augment,
            missing_caption=self.missing_caption,
            skips=self.skips[split],
        )


LaionSubsetDataModule = WebDatasetDataModule

__all__ = [
    "IMAGE_KEYS",
    "LaionSubsetDataModule",
    "WebDatasetDataModule",
    "WebDatasetSamples",
    "decode_shard_sample",
    "expand_shards",
]
