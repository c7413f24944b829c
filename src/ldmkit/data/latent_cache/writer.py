"""Writing a latent cache: encode a dataset split once with the LDM's frozen encoders into webdataset shards
plus cache.json (`python -m ldmkit.cli.latent_cache`)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ldmkit.data.collate import collate_samples
from ldmkit.data.export_shards import add_member
from ldmkit.artifacts import PRODUCERS
from ldmkit.nn.frozen import FrozenEncoders as SharedFrozenEncoders
from ldmkit.nn.frozen import load_frozen_encoders
from ldmkit.data.latent_cache.format import CACHE_FILE, CACHE_FORMAT, CACHE_VERSION, DTYPES, LatentCacheError

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
