"""Denoising backbones behind one contract, and the registry that builds them by name.

Every backbone is an `nn.Module` (subclassing `base.Backbone`, which implements the shared parts:
the attributes read from the config, `from_preset`, the forward-input checks, gradient checkpointing) with
    forward(x (B, C, H, W), t (B,) float network time input, context (B, L, D) | None,
            pooled (B, P) | None, context_mask (B, L) bool | None) -> (B, C_out, H, W)
and the attributes
    arch: str                  the registry name
    config                     its typed config dataclass (`config_class`), JSON-able with dataclasses.asdict
    in_channels, out_channels  latent channels in and out
    context_dim, pooled_dim    text-token width and pooled-embedding width it was built for (None: not used)
    latent_size_multiple       latent H and W must be multiples of it (UNet: 2^(levels-1); transformers: patch)
    presets                    dict name -> config (optional)
The config dataclass of every arch has the fields `in_channels`, `out_channels`, `context_dim` and
`pooled_dim`: the facts the LDM takes from its frozen encoders (`BACKBONE_FACTS`).

Adding an arch is one line in `BACKBONES` ("module:Class", resolved lazily) plus its module.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

BACKBONES: dict[str, str] = {
    "unet": "ldmkit.nn.backbones.unet:UNet",
    "dit": "ldmkit.nn.backbones.dit:DiT",
    "mmdit": "ldmkit.nn.backbones.mmdit:MMDiT",
}

# what the LDM stage fills in from its artifacts (autoencoder latent channels, text encoder widths)
BACKBONE_FACTS = ("in_channels", "out_channels", "context_dim", "pooled_dim")


class BackboneError(ValueError):
    """An unknown arch, a bad config, or a config that contradicts the artifacts."""


class BackboneFactMismatch(BackboneError):
    """A config field that the artifacts determine was set to another value."""

    def __init__(self, key: str, given: Any, needed: Any) -> None:
        self.key, self.given, self.needed = key, given, needed
        super().__init__(f"backbone {key}={given} but the artifacts give {needed}")


def backbone_class(arch: str) -> type[nn.Module]:
    if arch not in BACKBONES:
        raise BackboneError(f"Unknown backbone arch '{arch}'; choose one of {', '.join(BACKBONES)} "
                            "(an artifact naming another arch was written by a newer ldmkit or edited by hand).")
    module, name = BACKBONES[arch].split(":")
    return getattr(importlib.import_module(module), name)


def backbone_config(arch: str, preset: str | None = None, **fields: Any) -> Any:
    """The typed config of `arch`: `preset` (if given) with `fields` replaced."""
    cls = backbone_class(arch)
    config_class = cls.config_class
    valid = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise BackboneError(f"backbone '{arch}' has no config field(s) {unknown}; valid fields: {sorted(valid)}.")
    if preset is None:
        return config_class(**fields)
    presets = getattr(cls, "presets", None) or {}
    if preset not in presets:
        raise BackboneError(f"backbone '{arch}' has no preset '{preset}'; choose one of {sorted(presets)}.")
    return dataclasses.replace(presets[preset], **fields)


def build_backbone(arch: str, config: Mapping[str, Any] | Any) -> nn.Module:
    """`arch` built from its config dataclass or a mapping of its fields (e.g. an artifact's `backbone.config`)."""
    if isinstance(config, Mapping):
        config = backbone_config(arch, **{str(k): v for k, v in config.items()})
    return backbone_class(arch)(config)


def backbone_factory(arch: str, preset: str | None = None, *, facts: Mapping[str, Any] | None = None,
                     **fields: Any) -> nn.Module:
    """What `conf/backbone/*.yaml` instantiate as a `_partial_`: the LDM calls it with `facts` (the keys of
    `BACKBONE_FACTS` its artifacts determine). A field set in the config must agree with its fact."""
    facts = dict(facts or {})
    for key, needed in facts.items():
        if key in fields and fields[key] != needed:
            raise BackboneFactMismatch(key, fields[key], needed)
    return build_backbone(arch, backbone_config(arch, preset, **{**fields, **facts}))


def backbone_spec(backbone: nn.Module) -> dict[str, Any]:
    """{"arch", "config"} as recorded in an artifact; `build_backbone(**spec)` rebuilds the architecture."""
    return {"arch": backbone.arch, "config": dataclasses.asdict(backbone.config)}


def check_latent_size(backbone: nn.Module, height: int, width: int) -> None:
    """Raise before training or sampling when the latent size does not fit the backbone."""
    m = int(backbone.latent_size_multiple)
    if height % m or width % m:
        raise BackboneError(
            f"the {backbone.arch} backbone needs latent height and width that are multiples of {m}, got {height}x{width}. "
            "Change the image resolution (data.resolution), or the backbone's depth / patch size."
        )
    table, patch = getattr(backbone.config, "pos_embed_max_size", None), getattr(backbone.config, "patch_size", 1)
    if table is not None and max(height, width) > table * patch:  # MMDiT: positions from a table x table patch table
        raise BackboneError(
            f"{height}x{width} latents make a {height // patch}x{width // patch} patch grid, larger than the {backbone.arch} "
            f"backbone's {table}x{table} position table: raise backbone.pos_embed_max_size (or patch_size), or lower "
            "the image resolution (data.resolution)."
        )


__all__ = [
    "BACKBONES", "BACKBONE_FACTS", "BackboneError", "BackboneFactMismatch", "backbone_class", "backbone_config",
    "backbone_factory", "backbone_spec", "build_backbone", "check_latent_size",
]
