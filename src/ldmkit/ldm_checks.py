"""What an `ldm` artifact's config.json promises, checked before any weight is read (issue 16, "Bad input"): a
backbone this ldmkit can build, widths that agree with the autoencoder and text encoder it references, and a
sample size the backbone takes. `load_text_to_image` and `eval.py`'s planning call these, so a wrong artifact or
size fails in milliseconds with the fix, not after the weights, the frozen encoders and the metrics have loaded.
Pure torch (the backbone is built on the meta device: shapes only, no memory, no weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmkit.artifacts import CONFIG_FILE, PRODUCERS, ArtifactError, read_artifact_config


def backbone_of(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(arch, config fields) an ldm artifact records (schema 1: the UNet's config under `unet`)."""
    if int(config.get("format_version", 1)) == 1 and "backbone" not in config:
        return "unet", dict(config.get("unet") or {})
    backbone = config.get("backbone") or {}
    return str(backbone.get("arch")), dict(backbone.get("config") or {})


def build_on_meta(folder: str | os.PathLike, config: dict[str, Any]) -> nn.Module:
    """The artifact's backbone with meta tensors (its architecture, no weights), or an `ArtifactError` that says why
    this ldmkit cannot build it and what to do."""
    from ldmkit.nn.backbones import build_backbone

    arch, fields = backbone_of(config)
    try:
        with torch.device("meta"):
            return build_backbone(arch, fields)
    except (ValueError, TypeError, KeyError) as err:
        raise ArtifactError(
            f"The ldm artifact '{folder}' records a backbone this ldmkit cannot build (arch '{arch}'): {err} Either the "
            f"artifact was written by a newer ldmkit (upgrade ldmkit to load it) or its {CONFIG_FILE} was edited (restore "
            f"its 'backbone' entry, e.g. re-export with `{PRODUCERS['ldm']}`). No weights were loaded."
        ) from None


def _referenced(path: Any) -> dict[str, Any] | None:
    """config.json of a referenced artifact folder; None for an open_clip file or a folder without one."""
    folder = Path(str(path))
    if not (folder / CONFIG_FILE).is_file():
        return None
    try:
        return read_artifact_config(folder)
    except ArtifactError:
        return None  # the loader of that artifact says what is wrong with it


def check_widths(folder: str | os.PathLike, config: dict[str, Any], backbone: nn.Module) -> None:
    """The backbone's context width must be the text encoder's token width, its input channels the autoencoder's
    latent channels: else `text_encoder` / `autoencoder` in config.json point at other artifacts than the model
    was trained with."""
    recorded = config.get("encoders") or {}
    pairs = (("text_encoder", "context_dim", "text_width", "text token width"),
             ("autoencoder", "in_channels", "latent_channels", "latent channels"))
    for key, field, fact, what in pairs:
        other = _referenced(config.get(key))
        needed, given = getattr(backbone, field, None), (other or {}).get(fact)
        if needed is None or given is None or int(needed) == int(given):
            continue
        hash_hint = f" (weights hash {recorded[key]})" if recorded.get(key) else ""
        raise ArtifactError(
            f"The ldm artifact '{folder}' was trained with a {what} of {needed} (its backbone's {field}), but the {key} it "
            f"references, '{config.get(key)}', has {given}: '{key}' in its {CONFIG_FILE} points at another artifact "
            f"than the one this model was trained with. Point it back at that {key}{hash_hint}. No weights were loaded."
        )


def check_ldm_config(folder: str | os.PathLike, config: dict[str, Any]) -> nn.Module:
    """Every check on an ldm artifact's config.json that needs no weights; returns the meta-device backbone."""
    backbone = build_on_meta(folder, config)
    check_widths(folder, config, backbone)
    return backbone


def sample_size_problem(backbone: nn.Module, factor: int, height: int, width: int) -> str | None:
    """Why the backbone cannot denoise `height` x `width` images (latents 1/`factor` of that), or None."""
    h, w = height // factor, width // factor
    multiple = int(backbone.latent_size_multiple)
    if h % multiple or w % multiple:
        return (f"the {backbone.arch} backbone needs latent sides that are multiples of {multiple}, and {height}x{width} "
                f"images make {h}x{w} latents (autoencoder downsampling {factor}): use height and width that are "
                f"multiples of {multiple * factor}")
    table = getattr(backbone.config, "pos_embed_max_size", None)  # MMDiT: a table of table x table patches
    patch = int(getattr(backbone.config, "patch_size", 1))
    if table is not None and max(h, w) > table * patch:
        return (f"{height}x{width} images make a {h // patch}x{w // patch} patch grid, larger than the {backbone.arch} "
                f"backbone's position table of {table}x{table} patches (pos_embed_max_size): use height and width of at "
                f"most {table * patch * factor}")
    return None
