"""Reading a latent cache: cached samples decoded from its shards and the `data=latent_cache` datamodule."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.images import SkipSample
from ldmkit.data.webdataset import WebDatasetSamples
from ldmkit.nn.frozen import encoder_hash
from ldmkit.data.latent_cache.format import (
    CACHE_FILE, COMMAND, TENSOR_MEMBERS, LatentCacheError, check_cache_encoders, read_cache_metadata,
)

def _load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def decode_cached_sample(raw: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Raw tar sample -> {"latent_mean", "latent_std", "context", "pooled", "caption", "attributes"} (float32),
    or raise SkipSample."""
    missing = [m for m in TENSOR_MEMBERS if m not in raw]
    if missing:
        raise SkipSample("decode_error", f"cached sample without {missing}")
    try:
        latent, context, pooled = (_load_npy(raw[m]) for m in TENSOR_MEMBERS)
    except (ValueError, OSError, EOFError) as err:
        raise SkipSample("decode_error", f"unreadable cached tensor: {err}") from err
    if shapes is not None:
        for name, tensor, expected in (("latent", latent, (2, *shapes["latent"])), ("context", context, shapes["context"]),
                                       ("pooled", pooled, shapes["pooled"])):
            if tuple(tensor.shape) != tuple(expected):
                raise SkipSample("decode_error", f"cached {name} has shape {tuple(tensor.shape)}, cache.json says {tuple(expected)}")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            loaded = json.loads(raw["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else str(meta.get("caption", ""))
    attributes = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else {}
    return {"latent_mean": latent[0], "latent_std": latent[1], "context": context, "pooled": pooled,
            "caption": caption, "attributes": attributes}


def collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the cached tensors (B, ...); captions and attribute dicts stay lists (docs/CONVENTIONS.md)."""
    if not samples:
        raise ValueError("collate_cached got an empty list of samples")
    batch: dict[str, Any] = {"caption": [s.get("caption", "") for s in samples], "attributes": [s.get("attributes", {}) for s in samples]}
    for key in samples[0].keys() - batch.keys():
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class CachedLatentSamples(WebDatasetSamples):
    """Cached samples from the shards of a latent cache: the same resampling, shuffling and rank/worker
    splitting as `WebDatasetSamples` (see ldmkit.data.webdataset), decoding cached tensors instead of images."""

    def __init__(self, urls: Sequence[str], shapes: dict[str, tuple[int, ...]], **options: Any) -> None:
        super().__init__(urls, resolution=1, **options)
        self.shapes = shapes

    def _decode(self, samples: Iterator[dict]) -> Iterator[dict[str, Any]]:
        for raw in samples:
            try:
                yield decode_cached_sample(raw, self.shapes)
            except SkipSample as skip:
                self.skips.add(skip.reason, f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}", skip.detail)


class LatentCacheDataModule(ImageTextDataModule):
    """Batches of cached posteriors and text embeddings (``data=latent_cache``), written by
    ``python -m ldmkit.data.latent_cache``: {"latent_mean", "latent_std" (B, C, h, w), "context" (B, L, D),
    "pooled" (B, P), "caption", "attributes"}; no "image".

    `path`: the cache folder. `val_path`: a separate cache (e.g. built with split=val), or None to hold
    out the cache's last shard. `test_path`: None means the val data. Train shards are resampled and
    shuffled per (seed, rank, worker, epoch) like `data=laion_subset`; `samples_per_epoch` None means
    the number of train samples in the cache. Nothing is read at construction; `setup()` reads
    cache.json and says how to build a missing cache.
    """

    name = "latent_cache"
    may_skip = True
    collate_fn = staticmethod(collate_cached)  # the base class's loaders (resumable train loader) with this collate

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 2,
        resolution: int = 32,
        seed: int = 42,
        *,
        path: str = "data/latent_cache",
        val_path: str | None = None,
        test_path: str | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        **loader_options: Any,
    ) -> None:
        super().__init__(batch_size, num_workers, resolution, seed, **loader_options)
        if self.hflip:
            raise ValueError(f"{self.name}: hflip cannot be applied to cached latents (the cache holds one encoding per "
                             "image); set data.hflip=false, or train from images to augment")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"{self.name}: samples_per_epoch must be >= 1 or null, got {samples_per_epoch}")
        self.paths = {"train": path, "val": val_path, "test": test_path}
        self.resampled, self.shuffle_buffer, self.samples_per_epoch = resampled, shuffle_buffer, samples_per_epoch
        self._metadata: dict[str, dict[str, Any]] | None = None
        self._urls: dict[str, list[str]] = {}

    def cache_metadata(self) -> dict[str, dict[str, Any]]:
        """cache.json of each distinct cache folder in use, by folder."""
        if self._metadata is None:
            metadata, urls = {}, {}
            for split, option in (("train", "path"), ("val", "val_path"), ("test", "test_path")):
                folder = self.paths[split]
                if folder:
                    metadata[str(folder)] = meta = read_cache_metadata(folder, option)
                    urls[split] = self._shard_paths(folder, meta)
            if not self.paths["val"]:
                if len(urls["train"]) < 2:
                    raise LatentCacheError(
                        f"{self.name}: the cache at data.path='{self.paths['train']}' is a single shard, so none can be held out "
                        f"for validation; build a validation cache (`{COMMAND} ... split=val out=DIR_VAL`) and set "
                        "data.val_path=DIR_VAL, or rebuild with a smaller shard_size"
                    )
                urls["train"], urls["val"] = urls["train"][:-1], urls["train"][-1:]  # hold out the last shard
            urls.setdefault("test", urls["val"])
            self._check_consistent(metadata)
            self._metadata, self._urls = metadata, urls
        return self._metadata

    def _shard_paths(self, folder: str, meta: dict[str, Any]) -> list[str]:
        paths = [str(Path(folder) / s["name"]) for s in meta["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise LatentCacheError(f"{self.name}: the cache at '{folder}' is incomplete: {len(missing)} shard(s) listed in "
                                   f"{CACHE_FILE} are missing (e.g. {missing[0]}); rebuild it with `{COMMAND} ... out={folder} overwrite=true`")
        return paths

    def _check_consistent(self, metadata: dict[str, dict[str, Any]]) -> None:
        for folder, meta in metadata.items():
            if int(meta["resolution"]) != self.resolution:
                raise LatentCacheError(
                    f"{self.name}: data.resolution={self.resolution} but the cache at '{folder}' was encoded from "
                    f"{meta['resolution']}-pixel images; set data.resolution={meta['resolution']} (the LDM samples "
                    "validation images at data.resolution) or rebuild the cache at this resolution"
                )
        (first, reference), *others = metadata.items()
        identity = lambda m: (m["autoencoder"]["weights_hash"], m["text_encoder"]["weights_hash"], int(m["text_encoder"]["clip_skip"]))
        for folder, meta in others:
            if identity(meta) != identity(reference):
                raise LatentCacheError(
                    f"{self.name}: the caches at '{first}' and '{folder}' were made with different encoders "
                    f"(autoencoder, text encoder weights hashes, clip_skip: {identity(reference)} vs {identity(meta)}); "
                    f"rebuild one of them with the other's encoders (`{COMMAND} ... out=DIR overwrite=true`)"
                )

    def check_encoders(self, autoencoder: str, text_encoder: str, clip_skip: int) -> None:
        """Raise LatentCacheError unless every cache in use was made with these encoders (the LDM calls this in setup)."""
        hashes = {"autoencoder": encoder_hash(autoencoder), "text_encoder": encoder_hash(text_encoder)}
        for folder, meta in self.cache_metadata().items():
            check_cache_encoders(meta, folder, autoencoder=autoencoder, text_encoder=text_encoder, clip_skip=clip_skip, hashes=hashes)

    def check_source(self) -> None:
        self.cache_metadata()

    def make_dataset(self, split: str, augment: bool = False) -> CachedLatentSamples:
        metadata = self.cache_metadata()
        meta = metadata[str(self.paths["train"])]
        shapes = {"latent": tuple(meta["latent_shape"]), "context": tuple(meta["context_shape"]), "pooled": tuple(meta["pooled_shape"])}
        train = split == "train"
        per_epoch = self.samples_per_epoch
        if train and per_epoch is None:
            counts = {str(Path(self.paths["train"]) / s["name"]): s["count"] for s in meta["shards"]}
            per_epoch = sum(counts[u] for u in self._urls["train"])
        return CachedLatentSamples(
            self._urls[split], shapes, seed=self.seed + SPLITS.index(split), resampled=self.resampled and train,
            shuffle_buffer=self.shuffle_buffer if train else 0, samples_per_epoch=per_epoch if train else None,
            skips=self.skips[split],
        )
