"""The latent cache's format: its file names and options, cache.json, and the identity of the frozen encoders a
cache was made with (a cache is only valid for the encoders it was encoded with)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from ldmkit.nn.frozen import encoder_hash


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
