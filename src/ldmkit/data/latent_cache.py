"""Latent / text-embedding cache: encode a dataset once so LDM training skips both frozen encoders.

    python -m ldmkit.data.latent_cache data=shapes model.autoencoder=PATH model.text_encoder=PATH out=DIR
        [split=train] [num_samples=N] [shard_size=1000] [batch_size=64] [dtype=float16] [device=auto]
        [overwrite=false] [model.clip_skip=1 data.resolution=64 ...]

The config is composed by Hydra from conf/train.yaml with ``model=ldm``, so the overrides that
train.py takes select the same data (``data=...``, ``data.resolution=...``, ``seed=...``) and the
same frozen encoders (``model.autoencoder``, ``model.text_encoder``, ``model.text_encoder_arch``,
``model.clip_skip``). The cache options are plain ``key=value`` arguments:

- ``out`` (required): the cache folder, written atomically (a temporary sibling renamed into place)
- ``split``: train | val | test of the source data (default train; augmentation is never applied)
- ``num_samples``: default the whole split (required for endless sources, e.g. resampled shards:
  give ``num_samples=N`` or ``data.resampled=false``)
- ``shard_size``: samples per tar shard (default 1000); ``batch_size``: encoder batch (default data.batch_size)
- ``dtype``: float16 (default) | float32, the storage type of the tensors
- ``device``: auto (cuda when available) | cpu | cuda | cuda:N
- ``overwrite``: replace an existing cache at ``out`` (default false; never replaces a folder that
  is not a latent cache)

Layout: webdataset shards ``00000.tar``, ... of samples ``KEY.latent.npy`` (the autoencoder's
posterior, ``stack([mean, std])``: (2, C, H/f, W/f), *un-normalised*: scale/shift are applied by
the LDM, so a re-measured scale factor does not invalidate the cache), ``KEY.context.npy`` (L, D)
and ``KEY.pooled.npy`` (P,) text embeddings (after clip skip), ``KEY.txt`` (caption) and
``KEY.json`` (key, caption, split, index, attributes); plus ``cache.json`` with the encoders'
paths and weights hashes, clip_skip, resolution, shapes, dtype, the per-shard counts and the
command's overrides. Train on it with ``data=latent_cache data.path=DIR``: each step draws a fresh
z = mean + std·ε (as encoding images would), and the LDM checks the cache was made with its own
autoencoder / text encoder / clip_skip before training. Captions are frozen at cache time
(per-epoch caption or image augmentation, e.g. hflip, is not possible from a cache).
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ldmkit.data.base import SPLITS, ImageTextDataModule
from ldmkit.data.collate import collate_samples
from ldmkit.data.export_shards import add_member
from ldmkit.data.images import SkipSample
from ldmkit.data.webdataset import WebDatasetSamples
from ldmkit.artifacts import PRODUCERS
from ldmkit.nn.frozen import FrozenEncoders as SharedFrozenEncoders
from ldmkit.nn.frozen import encoder_hash, load_frozen_encoders

COMMAND = "python -m ldmkit.data.latent_cache"
CACHE_FILE = "cache.json"
CACHE_FORMAT = "ldmkit-latent-cache"
CACHE_VERSION = 1
TENSOR_MEMBERS = ("latent.npy", "context.npy", "pooled.npy")
DTYPES = {"float16": np.float16, "float32": np.float32}
OPTIONS = {"out": None, "split": "train", "num_samples": None, "shard_size": 1000, "batch_size": None,
           "dtype": "float16", "device": "auto", "overwrite": False}
# the overrides that choose the frozen encoders (replaced in the suggested rebuild command)
ENCODER_KEYS = ("model.autoencoder", "model.text_encoder", "model.text_encoder_arch", "model.clip_skip")


class LatentCacheError(ValueError):
    """A latent cache that cannot be used as asked (made with other encoders, other resolution, ...)."""


# ---------------------------------------------------------------------------------------------
# Encoder identity: which frozen encoders a cache was made with
# ---------------------------------------------------------------------------------------------


def rebuild_command(metadata: dict[str, Any], out: str | os.PathLike, **encoders: Any) -> str:
    """The cache command that rebuilds `out` from the same data with `encoders` (model.* key -> value)."""
    data_overrides = [o for o in metadata.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") not in ENCODER_KEYS]
    encoder_overrides = [f"model.{k}={v}" for k, v in encoders.items() if v is not None]
    options = metadata.get("options", {})
    extra = [f"{k}={options[k]}" for k in ("split", "num_samples", "shard_size", "dtype") if options.get(k) is not None]
    args = [*data_overrides, *encoder_overrides, f"out={out}", *extra, "overwrite=true"]
    return " ".join([COMMAND, *(shlex.quote(a) for a in args)])


def check_cache_encoders(
    metadata: dict[str, Any], cache_dir: str | os.PathLike, *, autoencoder: str, text_encoder: str, clip_skip: int,
    hashes: dict[str, str] | None = None,
) -> None:
    """Raise LatentCacheError unless the cache was encoded with these weights and clip_skip."""
    hashes = hashes or {"autoencoder": encoder_hash(autoencoder), "text_encoder": encoder_hash(text_encoder)}
    problems = []
    for name, path, option in (("autoencoder", autoencoder, "model.autoencoder"), ("text_encoder", text_encoder, "model.text_encoder")):
        cached = metadata[name]
        if cached["weights_hash"] != hashes[name]:
            problems.append(
                f"{name}: the cache was encoded with '{cached['path']}' (weights hash {cached['weights_hash']}), "
                f"but {option}='{path}' has weights hash {hashes[name]}"
            )
    cached_skip = int(metadata["text_encoder"]["clip_skip"])
    if cached_skip != int(clip_skip):
        problems.append(f"clip_skip: the cache holds text embeddings with clip_skip={cached_skip}, but model.clip_skip={clip_skip}")
    if problems:
        command = rebuild_command(metadata, cache_dir, autoencoder=autoencoder, text_encoder=text_encoder, clip_skip=clip_skip,
                                  text_encoder_arch=metadata["text_encoder"].get("model_name"))
        raise LatentCacheError(
            f"latent cache '{cache_dir}' was not made with the model's frozen encoders:\n  - " + "\n  - ".join(problems)
            + "\nTraining on it would teach the UNet another autoencoder's latents / another text encoder's embeddings. "
            f"Rebuild the cache with the model's encoders:\n    {command}\n"
            "or set model.autoencoder / model.text_encoder / model.clip_skip back to the ones the cache was made with "
            f"(see {Path(cache_dir) / CACHE_FILE})."
        )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class FrozenEncoders(SharedFrozenEncoders):
    """The LDM's frozen autoencoder + text encoder (`ldmkit.nn.frozen`, loaded exactly as the LDM loads them);
    called on a batch it gives what the cache stores."""

    def __init__(self, autoencoder: str, text_encoder: str, clip_skip: int = 1, text_encoder_arch: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        if not autoencoder or not text_encoder:
            missing = "model.autoencoder" if not autoencoder else "model.text_encoder"
            producer = PRODUCERS["autoencoder" if not autoencoder else "clip"]
            raise LatentCacheError(
                f"the latent cache needs the LDM's frozen encoders: set {missing}=PATH to the `artifact/` folder written by "
                f"`{producer}` (the same value you give train.py model=ldm)."
            )
        loaded = load_frozen_encoders(autoencoder, text_encoder, clip_skip=clip_skip, text_encoder_arch=text_encoder_arch,
                                      device=device, error=LatentCacheError)
        super().__init__(loaded.autoencoder, loaded.text_encoder, loaded.scale_factor, loaded.shift_factor, loaded.identity)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        posterior = self.encode_posterior(images.to(self.device))
        context, pooled = self.encode_text(captions)
        return {
            "latent": torch.stack([posterior.mean, posterior.std], dim=1),  # (B, 2, C, h, w)
            "context": context,  # (B, L, D)
            "pooled": pooled,  # (B, P)
        }


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _source_batches(dataset: Dataset, num_samples: int | None, batch_size: int, num_workers: int) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """(indices, collated image batch) over the first `num_samples` samples of a split, in order."""
    if isinstance(dataset, IterableDataset):
        if num_samples is None and getattr(dataset, "resampled", False):
            raise LatentCacheError("this split is an endless resampled stream: give num_samples=N, or data.resampled=false to cache each sample once")
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
        seen = 0
        for batch in loader:
            take = len(batch["caption"]) if num_samples is None else min(len(batch["caption"]), num_samples - seen)
            yield list(range(seen, seen + take)), {k: v[:take] for k, v in batch.items()}
            seen += take
            if num_samples is not None and seen >= num_samples:
                return
        return
    total = len(dataset) if num_samples is None else int(num_samples)
    if total > len(dataset):
        raise LatentCacheError(f"num_samples={total} but the split has only {len(dataset)} samples")
    loader = DataLoader(Subset(dataset, range(total)), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples)
    start = 0
    for batch in loader:
        n = len(batch["caption"])
        yield list(range(start, start + n)), batch
        start += n


def write_cache_shards(samples: Iterable[dict[str, bytes]], folder: Path, shard_size: int) -> list[dict[str, Any]]:
    """Write samples (member suffix -> bytes, keyed as export_shards keys them) into folder/00000.tar, ...;
    returns [{"name", "count"}] per shard."""
    digits = len(str(shard_size - 1))
    shards: list[dict[str, Any]] = []
    tar = None
    try:
        for count, members in enumerate(samples):
            shard, position = divmod(count, shard_size)
            if position == 0:
                if tar is not None:
                    tar.close()
                shards.append({"name": f"{shard:05d}.tar", "count": 0})
                tar = tarfile.open(folder / shards[-1]["name"], "w", format=tarfile.USTAR_FORMAT)
            key = f"{shard:05d}{position:0{digits}d}"
            for suffix, data in members.items():
                add_member(tar, f"{key}.{suffix}", data)
            shards[-1]["count"] += 1
    finally:
        if tar is not None:
            tar.close()
    return shards


def _encoded_samples(batches: Iterable[tuple[list[int], dict[str, Any]]], encoders: FrozenEncoders, dtype: str, split: str,
                     progress: int | None) -> Iterator[dict[str, bytes]]:
    np_dtype, done, started = DTYPES[dtype], 0, time.monotonic()
    for indices, batch in batches:
        encoded = encoders(batch["image"], batch["caption"])
        arrays = {}
        for name, tensor in encoded.items():
            stored = tensor.float().cpu().numpy().astype(np_dtype)
            if not np.isfinite(stored).all():
                raise LatentCacheError(f"the encoded {name} is not finite in {dtype} (out of range or a broken encoder); try dtype=float32")
            arrays[name] = stored
        for i, index in enumerate(indices):
            caption = str(batch["caption"][i])
            meta = {"caption": caption, "split": split, "index": int(index), "attributes": batch["attributes"][i]}
            yield {
                "latent.npy": _npy(arrays["latent"][i]), "context.npy": _npy(arrays["context"][i]),
                "pooled.npy": _npy(arrays["pooled"][i]), "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8"),
            }
        done += len(indices)
        if progress and (done // progress) != ((done - len(indices)) // progress):
            print(f"latent_cache: {done} samples encoded ({done / (time.monotonic() - started):.1f}/s)", flush=True)


def prepare_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise LatentCacheError(f"out={out} exists and is not a folder; choose another out=DIR")
    if not any(out.iterdir()):
        return
    if not (out / CACHE_FILE).is_file():
        raise LatentCacheError(f"out={out} is a non-empty folder that is not a latent cache (no {CACHE_FILE}); "
                               "choose a new or empty folder (overwrite=true only replaces an existing latent cache)")
    if not overwrite:
        raise LatentCacheError(f"out={out} already holds a latent cache; pass overwrite=true to replace it")


def build_latent_cache(
    dataset: Dataset,
    out: str | os.PathLike,
    encoders: FrozenEncoders,
    *,
    resolution: int,
    split: str = "train",
    num_samples: int | None = None,
    shard_size: int = 1000,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Encode (the first `num_samples` of) `dataset` into a cache folder at `out` (atomically); returns `out`."""
    from ldmkit.nn.autoencoder import check_resolution

    if dtype not in DTYPES:
        raise LatentCacheError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if int(shard_size) < 1 or int(batch_size) < 1:
        raise LatentCacheError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out = Path(out)
    prepare_out(out, overwrite)
    factor = encoders.identity["autoencoder"]["downsampling_factor"]
    check_resolution(resolution, factor)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        batches = _source_batches(dataset, num_samples, int(batch_size), int(num_workers))
        progress = max(int(batch_size), 10 ** max(2, int(math.log10(num_samples or 10_000)) - 1))
        shards = write_cache_shards(_encoded_samples(batches, encoders, dtype, split, progress), tmp, int(shard_size))
        if not shards:
            raise LatentCacheError("nothing to cache: the split yielded no samples")
        identity = encoders.identity
        latent_side = resolution // factor
        metadata = {
            "format": CACHE_FORMAT, "format_version": CACHE_VERSION, **identity,
            "resolution": int(resolution),
            "latent_shape": [identity["autoencoder"]["latent_channels"], latent_side, latent_side],
            "context_shape": [identity["text_encoder"]["context_length"], identity["text_encoder"]["context_dim"]],
            "pooled_shape": [identity["text_encoder"]["pooled_dim"]],
            "latent_layout": "KEY.latent.npy = stack([posterior mean, posterior std]): (2, C, H/f, W/f), un-normalised",
            "dtype": dtype, "count": sum(s["count"] for s in shards), "shards": shards, "split": split,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(provenance or {}),
        }
        (tmp / CACHE_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        if out.exists():  # empty, or a cache we may replace (checked above): swap, then drop the old one
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_cache_metadata(path: str | os.PathLike, option: str = "path") -> dict[str, Any]:
    """cache.json of a finished cache; a missing one raises an error naming the cache command."""
    folder = Path(path)
    file = folder / CACHE_FILE
    if not file.is_file():
        why = "does not exist" if not folder.exists() else f"has no {CACHE_FILE}, so it is not a finished latent cache"
        raise FileNotFoundError(
            f"latent_cache: data.{option}='{folder}' {why}. Encode your dataset once with the encoders you train with:\n"
            f"    {COMMAND} data=shapes model.autoencoder=PATH model.text_encoder=PATH out={folder}\n"
            "(give it the same data=... / data.resolution / model.* overrides as train.py; add split=val "
            "out=DIR_VAL for a separate validation cache, then data.val_path=DIR_VAL), "
            "or train from images with data=shapes or data=laion_subset."
        )
    try:
        metadata = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise LatentCacheError(f"'{file}' is not valid JSON ({err}); rebuild the cache with `{COMMAND} ... out={folder} overwrite=true`") from err
    if metadata.get("format") != CACHE_FORMAT or int(metadata.get("format_version", -1)) > CACHE_VERSION:
        raise LatentCacheError(
            f"'{file}' is not a latent cache this version of ldmkit reads (format {metadata.get('format')!r} "
            f"version {metadata.get('format_version')!r}); rebuild it with `{COMMAND} ... out={folder} overwrite=true`"
        )
    return metadata


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

__all__ = [
    "CachedLatentSamples", "FrozenEncoders", "LatentCacheDataModule", "LatentCacheError", "build_latent_cache",
    "check_cache_encoders", "collate_cached", "decode_cached_sample", "encoder_hash", "read_cache_metadata",
]


if __name__ == "__main__":  # `python -m ldmkit.data.latent_cache`: the command lives in ldmkit.cli
    from ldmkit.cli.latent_cache import main

    main()
