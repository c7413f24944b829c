"""Stable Diffusion's VAE <-> ldmkit's `AutoencoderKL`: configs and state-dict keys (pure torch).

diffusers' `AutoencoderKL` (SD 1.x/2.x `vae/`) and ldmkit's autoencoder are the same network
(Rombach et al. 2022, App. G): the names differ, the mid-block attention keeps separate Q/K/V
linears in diffusers (one 1x1 conv here), and SD pads right/bottom only before each stride-2 conv
(`AutoencoderConfig.asymmetric_downsample`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldmkit.nn.autoencoder import AutoencoderConfig

SD_LATENT_SCALE = 0.18215  # SD 1.x/2.x `scaling_factor` (Rombach et al. 2022, Sec. 4.3.2: 1/std of latents)

# diffusers config keys whose value must be the default for the network to be ours
_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


class InteropError(ValueError):
    """A checkpoint cannot be converted: what was seen, and what is supported instead."""


def autoencoder_config_from_diffusers(cfg: Mapping[str, Any]) -> AutoencoderConfig:
    """`AutoencoderConfig` of a diffusers `AutoencoderKL` config dict (`vae/config.json`)."""
    for key, needed in _VAE_FIXED.items():
        if cfg.get(key, needed) != needed:
            raise InteropError(f"VAE config has {key}={cfg.get(key)!r}; only {needed!r} (Stable Diffusion's) is supported.")
    down, up = list(cfg.get("down_block_types", [])), list(cfg.get("up_block_types", []))
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or len(down) != len(up):
        raise InteropError(f"VAE block types {down} / {up} are not SD's AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D).")
    widths = [int(w) for w in cfg["block_out_channels"]]
    if any(w % widths[0] for w in widths):
        raise InteropError(f"VAE block_out_channels {widths} are not multiples of the first one; ldmkit needs channel_mult.")
    return AutoencoderConfig(
        in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
        base_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=int(cfg.get("layers_per_block", 1)), latent_channels=int(cfg.get("latent_channels", 4)),
        mid_attention=True, attention_heads=1, num_groups=int(cfg.get("norm_num_groups", 32)),
        resolution=None, asymmetric_downsample=True,
    )


def diffusers_autoencoder_config(config: AutoencoderConfig, scaling_factor: float = SD_LATENT_SCALE,
                                 sample_size: int = 512) -> dict[str, Any]:
    """diffusers `AutoencoderKL` constructor kwargs for the same network as `AutoencoderKL(config)`."""
    widths = [config.base_channels * m for m in config.channel_mult]
    if not config.mid_attention or config.attention_heads != 1 or not config.asymmetric_downsample:
        raise InteropError("only SD-style autoencoders (mid attention with 1 head, asymmetric_downsample=true) export to "
                           f"diffusers' AutoencoderKL; this one has mid_attention={config.mid_attention}, "
                           f"attention_heads={config.attention_heads}, asymmetric_downsample={config.asymmetric_downsample}.")
    if any(w % config.num_groups for w in widths):
        raise InteropError(f"diffusers' GroupNorm needs widths {widths} divisible by num_groups={config.num_groups}.")
    n = len(widths)
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=widths, layers_per_block=config.num_res_blocks, act_fn="silu",
        latent_channels=config.latent_channels, norm_num_groups=config.num_groups,
        sample_size=sample_size, scaling_factor=scaling_factor,
    )


_MODULES = [  # (diffusers, ldmkit) module paths, "{i}" a level index; applied in order, in either direction
    (".down_blocks.{i}.resnets.", ".down.{i}.blocks."),
    (".down_blocks.{i}.downsamplers.0.conv.", ".down.{i}.downsample.op."),
    (".up_blocks.{i}.resnets.", ".up.{i}.blocks."),
    (".up_blocks.{i}.upsamplers.0.conv.", ".up.{i}.upsample.conv."),
    (".mid_block.resnets.0.", ".mid.block1."),
    (".mid_block.resnets.1.", ".mid.block2."),
    (".mid_block.attentions.0.group_norm.", ".mid.attn.norm."),
    (".mid_block.attentions.0.to_out.0.", ".mid.attn.proj_out."),
    (".conv_shortcut.", ".skip."),
    (".conv_norm_out.", ".norm_out."),
]


def _rules(source: int) -> list[tuple[str, str]]:
    """(regex, replacement) rules from column `source` of `_MODULES` to the other column."""
    return [(re.escape(pair[source]).replace(re.escape("{i}"), r"(\d+)"), pair[1 - source].replace("{i}", r"\1"))
            for pair in _MODULES]


_RENAMES, _INVERSE = _rules(0), _rules(1)  # diffusers -> ldmkit, ldmkit -> diffusers
_ATTN = ".mid_block.attentions.0."


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def autoencoder_state_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` state dict -> ldmkit `AutoencoderKL` names (Q/K/V fused into one 1x1 conv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _ATTN in key and re.search(r"\.to_[qkv]\.", key):
            continue  # fused below
        if _ATTN in key and ".to_out.0.weight" in key and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv kernel
        out[_rename(key, _RENAMES)] = value
    for part in ("encoder", "decoder"):
        prefix = f"{part}{_ATTN}"
        for kind in ("weight", "bias"):
            qkv = [state[f"{prefix}to_{n}.{kind}"] for n in "qkv"]
            fused = torch.cat([t.reshape(t.shape[0], -1) if kind == "weight" else t for t in qkv])
            out[f"{part}.mid.attn.qkv.{kind}"] = fused[:, :, None, None] if kind == "weight" else fused
    return out


def autoencoder_state_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ldmkit `AutoencoderKL` state dict -> diffusers `AutoencoderKL` names (inverse of the above)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".mid.attn.qkv." in key:
            part, kind = key.split(".")[0], key.rsplit(".", 1)[1]
            for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{part}{_ATTN}to_{name}.{kind}"] = chunk.flatten(1) if kind == "weight" else chunk
            continue
        if ".mid.attn.proj_out.weight" in key:
            value = value.flatten(1)  # 1x1 conv kernel -> linear
        out[_rename(key, _INVERSE)] = value
    return out
