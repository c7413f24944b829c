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

# The package is the cache's public face (conf/data/latent_cache.yaml, the CLI and the LDM import from here):
# format.py (file names, cache.json, encoder identity), writer.py (encoding a dataset once), reader.py (the
# data=latent_cache datamodule). `python -m ldmkit.data.latent_cache` runs __main__.py, a shim to ldmkit.cli.
from ldmkit.data.latent_cache.format import (
    CACHE_FILE, CACHE_FORMAT, CACHE_VERSION, COMMAND, DTYPES, ENCODER_KEYS, OPTIONS, TENSOR_MEMBERS, LatentCacheError,
    check_cache_encoders, read_cache_metadata, rebuild_command,
)
from ldmkit.data.latent_cache.reader import CachedLatentSamples, LatentCacheDataModule, collate_cached, decode_cached_sample
from ldmkit.data.latent_cache.writer import FrozenEncoders, build_latent_cache, prepare_out, write_cache_shards
from ldmkit.nn.frozen import encoder_hash

__all__ = [
    "CACHE_FILE", "CACHE_FORMAT", "CACHE_VERSION", "COMMAND", "DTYPES", "ENCODER_KEYS", "OPTIONS", "TENSOR_MEMBERS",
    "CachedLatentSamples", "FrozenEncoders", "LatentCacheDataModule", "LatentCacheError", "build_latent_cache",
    "check_cache_encoders", "collate_cached", "decode_cached_sample", "encoder_hash", "prepare_out",
    "read_cache_metadata", "rebuild_command", "write_cache_shards",
]
