"""Stable Diffusion's UNet (diffusers `UNet2DConditionModel`) <-> ldmkit's `UNet`: configs and keys.

diffusers -> ldmkit keys is `ldmkit.nn.unet.state_dict_from_diffusers`; this module adds the config
translation and the inverse key mapping. diffusers' `attention_head_dim` is the head count (a
historical misnomer): SD 1.x has 8 heads everywhere, SD 2.x 64-channel heads (5, 10, 20, 20).

GroupNorm eps: SD's ResNet blocks and output norm use `norm_eps` 1e-5, its transformers' GroupNorm 1e-6.
`UNetConfig.norm_eps` (default 1e-6, ldmkit's own models) is read from `norm_eps` on import and written back on
export; the transformers' GroupNorm is 1e-6 on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldmkit.interop.vae import InteropError
from ldmkit.nn.unet import UNetConfig, diffusers_unet_kwargs

SD_NORM_EPS = 1e-5  # diffusers' UNet2DConditionModel default, SD 1.x/2.x's ResNet GroupNorm eps


# diffusers options whose value must be the default (SD 1.x/2.x's) for the network to be ldmkit's UNet
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "act_fn": "silu", "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "attention_type": "default", "num_attention_heads": None, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "addition_time_embed_dim": None, "reverse_transformer_layers_per_block": None,
}


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """`UNetConfig` of a diffusers `UNet2DConditionModel` config dict (`unet/config.json`)."""
    if cfg.get("addition_embed_type") == "text_time":
        raise InteropError("this UNet is SDXL's (addition_embed_type='text_time'): SDXL is not supported yet; "
                           "SD 1.x and SD 2.x UNets are.")
    for key, needed in _UNET_FIXED.items():
        if key in cfg and cfg[key] != needed and not (key == "mid_block_scale_factor" and float(cfg[key]) == 1.0):
            raise InteropError(f"UNet config has {key}={cfg[key]!r}; ldmkit's UNet supports only {needed!r} "
                               "(Stable Diffusion 1.x/2.x's value).")
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    kinds = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if not set(down) <= kinds or [b.replace("Up", "Down") for b in reversed(up)] != down:
        raise InteropError(f"UNet blocks {down} / {up} are not SD's (CrossAttnDownBlock2D/DownBlock2D, mirrored up blocks).")
    widths = [int(w) for w in cfg["block_out_channels"]]
    levels = tuple(i for i, b in enumerate(down) if b == "CrossAttnDownBlock2D")
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = set(depth) if isinstance(depth, (list, tuple)) else {depth}
    if len(depth) != 1 or isinstance(cfg.get("layers_per_block", 2), (list, tuple)):
        raise InteropError("UNets with per-level transformer depth or ResNet count are not supported.")
    heads = cfg.get("attention_head_dim", 8)
    attention_widths = [widths[i] for i in levels] + [widths[-1]]
    if isinstance(heads, (list, tuple)):
        per_level = [int(heads[i]) for i in levels] + [int(heads[-1])]
        dims = {w // h for w, h in zip(attention_widths, per_level)}
        if len(set(per_level)) == 1:
            num_heads, head_dim = per_level[0], None
        elif len(dims) == 1:
            num_heads, head_dim = None, dims.pop()
        else:
            raise InteropError(f"UNet attention_head_dim {heads}: neither a fixed head count nor a fixed head width.")
    else:
        num_heads, head_dim = int(heads), None
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=int(cfg.get("layers_per_block", 2)), attention_levels=levels, num_heads=num_heads,
        head_dim=head_dim, transformer_depth=int(depth.pop()), context_dim=int(cfg["cross_attention_dim"]),
        time_embed_dim=cfg.get("time_embedding_dim"), norm_groups=int(cfg.get("norm_num_groups", 32)),
        scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        dropout=float(cfg.get("dropout", 0.0)), norm_eps=float(cfg.get("norm_eps", SD_NORM_EPS)),
    )


def diffusers_unet_config(config: UNetConfig, *, linear_projection: bool = True, sample_size: int = 64,
                          upcast_attention: bool = False) -> dict[str, Any]:
    """`UNet2DConditionModel` kwargs of `UNet(config)` (its `norm_eps` is `config.norm_eps`); SD 1.x's files use
    conv projections."""
    if config.pooled_dim:
        raise InteropError("a UNet with pooled_dim (pooled text embedding) has no SD 1.x/2.x diffusers equivalent.")
    kwargs = diffusers_unet_kwargs(config)
    heads = [config.heads(w) for w in config.widths]
    kwargs.update(attention_head_dim=heads[0] if len(set(heads)) == 1 else list(heads), use_linear_projection=linear_projection,
                  sample_size=sample_size, upcast_attention=upcast_attention,
                  class_embed_type=None, projection_class_embeddings_input_dim=None,
                  block_out_channels=list(kwargs["block_out_channels"]), down_block_types=list(kwargs["down_block_types"]),
                  up_block_types=list(kwargs["up_block_types"]))
    if kwargs["time_embedding_dim"] == 4 * config.model_channels:
        kwargs["time_embedding_dim"] = None
    return kwargs


_INVERSE = [
    (r"^time_embed\.", "time_embedding."),
    (r"^pooled_proj\.", "class_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.emb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.resample\.op\.", ".downsamplers.0.conv."),
    (r"\.resample\.conv\.", ".upsamplers.0.conv."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
]


def unet_state_to_diffusers(state: Mapping[str, torch.Tensor], *, linear_projection: bool = True) -> dict[str, torch.Tensor]:
    """ldmkit `UNet` state dict -> diffusers `UNet2DConditionModel` names (inverse of `state_dict_from_diffusers`);
    `linear_projection=False` writes SD 1.x's 1x1-conv `proj_in`/`proj_out` kernels."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in _INVERSE:
            new = re.sub(pattern, replacement, new)
        if new.endswith(".qkv.weight"):
            for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[new.replace(".qkv.weight", f".to_{name}.weight")] = chunk
        elif new.endswith(".kv.weight"):
            for name, chunk in zip("kv", value.chunk(2, dim=0)):
                out[new.replace(".kv.weight", f".to_{name}.weight")] = chunk
        elif new.endswith(".q.weight"):
            out[new.replace(".q.weight", ".to_q.weight")] = value
        else:
            if not linear_projection and re.search(r"attentions\.\d+\.proj_(in|out)\.weight$", new):
                value = value[:, :, None, None]  # linear weight -> 1x1 conv kernel
            out[new] = value
    return out
