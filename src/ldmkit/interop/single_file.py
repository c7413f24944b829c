"""Single-file checkpoints in the original CompVis/Stability layout <-> diffusers' component names.

The original layout (`ldm/models/diffusion/ddpm.py` `LatentDiffusion`) prefixes the UNet with
`model.diffusion_model.` (`input_blocks` / `middle_block` / `output_blocks`, ResBlocks as `in_layers` /
`emb_layers` / `out_layers`), the VAE with `first_stage_model.` (`down.i.block.j`, `mid.attn_1` with 1x1-conv
q/k/v, decoder levels numbered from the highest resolution), and the text encoder with
`cond_stage_model.transformer.` (SD 1.x: HF `CLIPTextModel` names) or `cond_stage_model.model.` (SD 2.x:
open_clip names, all 24 layers, of which SD uses 23). Only key names and 1x1-conv/linear reshapes change;
the mapping is written from the layouts themselves, as diffusers' `convert_diffusers_to_original_stable_diffusion.py`
and `single_file_utils.py` describe them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ldmkit.interop.vae import InteropError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SUPPORTED = "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder) and 2.x (OpenCLIP ViT-H/14)"
# checkpoint-level entries that are not weights of the three models (EMA copies, training state)
IGNORED_PREFIXES = ("model_ema.", "cond_stage_model.model.logit_scale", "alphas_cumprod", "alphas_cumprod_prev", "betas",
                    "sqrt_", "log_one_minus_alphas_cumprod", "posterior_", "model.diffusion_model.label_emb", "logvar",
                    "lvlb_weights", "cond_stage_model.transformer.text_model.embeddings.position_ids",
                    "cond_stage_model.model.text_projection", "cond_stage_model.model.attn_mask")

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def detect_family(keys: Iterable[str]) -> str:
    """'sd1' or 'sd2' from a single file's keys; a clear error for other model families."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        raise InteropError(f"this checkpoint is SDXL's (conditioner.embedders.*): SDXL is not supported yet; {SUPPORTED} are.")
    if has(UNET_PREFIX + "joint_blocks.") or has("text_encoders."):
        raise InteropError(f"this checkpoint is SD3's (joint_blocks): SD3 is not supported yet; {SUPPORTED} are.")
    if has("double_blocks.") or has(UNET_PREFIX + "double_blocks."):
        raise InteropError(f"this checkpoint is Flux's (double_blocks): Flux is not supported yet; {SUPPORTED} are.")
    if not has(UNET_PREFIX + "input_blocks."):
        sample = ", ".join(keys[:4])
        raise InteropError(f"not a Stable Diffusion checkpoint: no '{UNET_PREFIX}input_blocks.*' keys (first keys: {sample}). "
                           f"Supported: {SUPPORTED} single files, or diffusers folders.")
    if has(SD2_TEXT_PREFIX):
        return "sd2"
    if has(SD1_TEXT_PREFIX):
        return "sd1"
    raise InteropError(f"this single file has a UNet but no text encoder ('{SD1_TEXT_PREFIX}*' for SD 1.x or "
                       f"'{SD2_TEXT_PREFIX}*' for SD 2.x); import a full checkpoint or a diffusers folder.")


def unet_prefix_map(levels: int, layers: int, attention_levels: Iterable[int]) -> dict[str, str]:
    """diffusers UNet module prefixes -> original ones (for a UNet of `levels` levels, `layers` ResNets each)."""
    attn = set(attention_levels)
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{1 + i * (layers + 1) + layers}.0.op."
        up_has_attention = (levels - 1 - i) in attn
        for j in range(layers + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (layers + 1) + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (layers + 1) + j}.1."
        if i < levels - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (layers + 1) + layers}.{2 if up_has_attention else 1}.conv."
    return m


def _map_key(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str]) -> str | None:
    for src in sorted(prefixes, key=len, reverse=True):
        if key.startswith(src):
            rest = key[len(src):]
            if ".resnets." in src or ".block." in src:
                head, _, tail = rest.rpartition(".")
                rest = f"{inner.get(head, head)}.{tail}"
            return prefixes[src] + rest
    return None


def unet_to_original(key: str, prefixes: Mapping[str, str]) -> str:
    mapped = _map_key(key, prefixes, _RESNET)
    if mapped is None:
        raise InteropError(f"UNet key '{key}' has no place in the original layout.")
    return UNET_PREFIX + mapped


def unet_from_original(prefixes: Mapping[str, str]) -> dict[str, str]:
    """original module prefix -> diffusers prefix (inverse of `unet_prefix_map`), with inner ResNet names."""
    inverse = {}
    for src, dst in prefixes.items():
        inverse[dst] = src
    return inverse


def unet_key_from_original(key: str, inverse: Mapping[str, str]) -> str:
    body = key[len(UNET_PREFIX):]
    for dst in sorted(inverse, key=len, reverse=True):
        if body.startswith(dst):
            src, rest = inverse[dst], body[len(dst):]
            if ".resnets." in src or src.startswith("mid_block.resnets"):
                head, _, tail = rest.rpartition(".")
                rest = f"{ {v: k for k, v in _RESNET.items()}.get(head, head)}.{tail}"
            return src + rest
    raise InteropError(f"key '{key}' does not belong to a Stable Diffusion UNet of this shape (foreign or extra weights).")


def vae_prefix_map(levels: int, layers: int) -> dict[str, str]:
    """diffusers VAE module prefixes -> original ones; decoder levels are numbered from the top in the original."""
    m = {"encoder.mid_block.resnets.0.": "encoder.mid.block_1.", "encoder.mid_block.resnets.1.": "encoder.mid.block_2.",
         "decoder.mid_block.resnets.0.": "decoder.mid.block_1.", "decoder.mid_block.resnets.1.": "decoder.mid.block_2.",
         "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1.",
         "encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(levels):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        if i < levels - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    return m


def vae_state_to_original(state: Mapping, levels: int, layers: int) -> dict:
    """diffusers `AutoencoderKL` state -> `first_stage_model.*` (attention linears as 1x1 convs)."""
    prefixes, out = vae_prefix_map(levels, layers), {}
    for key, value in state.items():
        mapped = _map_vae(key, prefixes, _VAE_RESNET, _VAE_ATTN)
        if ".attn_1." in mapped and mapped.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + mapped] = value
    return out


def vae_state_from_original(state: Mapping, levels: int, layers: int) -> dict:
    """`first_stage_model.*` (prefix removed or not) -> diffusers `AutoencoderKL` names."""
    prefixes = {v: k for k, v in vae_prefix_map(levels, layers).items()}
    inner_res, inner_attn = ({v: k for k, v in d.items()} for d in (_VAE_RESNET, _VAE_ATTN))
    out = {}
    for key, value in state.items():
        mapped = _map_vae(key.removeprefix(VAE_PREFIX), prefixes, inner_res, inner_attn)
        if ".attentions.0." in mapped and mapped.endswith(".weight") and value.ndim == 4:
            value = value.flatten(1)
        out[mapped] = value
    return out


def _map_vae(key: str, prefixes: Mapping[str, str], inner_res: Mapping[str, str], inner_attn: Mapping[str, str]) -> str:
    for src in sorted(prefixes, key=len, reverse=True):
        if key.startswith(src):
            head, _, tail = key[len(src):].rpartition(".")
            inner = inner_attn if ("attn" in src or "attentions" in src) else inner_res
            return prefixes[src] + (f"{inner.get(head, head)}.{tail}" if head else tail)
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise InteropError(f"VAE key '{key}' does not belong to a Stable Diffusion VAE of this shape (foreign or extra weights).")
