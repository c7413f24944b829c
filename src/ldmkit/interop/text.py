"""Stable Diffusion's CLIP text encoder <-> ldmkit's open_clip text tower (pure torch).

SD 1.x conditions on the last hidden state of OpenAI's CLIP ViT-L/14 text transformer (12 layers,
QuickGELU, final LayerNorm); SD 2.x on the penultimate layer of OpenCLIP ViT-H/14's (GELU), with the
final LayerNorm applied, which diffusers stores as a 23-layer `CLIPTextModel`. ldmkit's text encoder is
an open_clip `CLIP` whose text tower holds those layers; `FrozenClipTextEncoder(clip_skip=1)` then
computes `ln_final(last layer)`, exactly SD's context. The image tower of an imported model is a
placeholder of zeros (SD ships no image tower), recorded as such in the artifact.

Tokens: both use CLIP's BPE (open_clip's bundled vocabulary), 77 positions. SD 1.x's tokenizer pads with
the end token (49407), SD 2.x's with "!" (0): the pad id is recorded as `text_cfg.tokenizer_kwargs.pad_id`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ldmkit.interop.vae import InteropError

# A minimal image tower (zeros) so the artifact is a loadable open_clip CLIP; never used by diffusion.
PLACEHOLDER_VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 32}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
BPE_VOCAB_SIZE = 49408


def clip_model_cfg_from_hf(cfg: Mapping[str, Any], pad_id: int = 0, layers: int | None = None) -> dict[str, Any]:
    """open_clip `model_cfg` (text tower = the HF `CLIPTextConfig` dict `cfg`, first `layers` layers)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise InteropError(f"text encoder hidden_act={act!r} is not CLIP's (quick_gelu for SD 1.x, gelu for SD 2.x).")
    if int(cfg.get("vocab_size", BPE_VOCAB_SIZE)) != BPE_VOCAB_SIZE:
        raise InteropError(f"text encoder vocab_size={cfg.get('vocab_size')}: only CLIP's BPE vocabulary ({BPE_VOCAB_SIZE}) is supported.")
    if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise InteropError(f"text encoder layer_norm_eps={cfg.get('layer_norm_eps')}: open_clip's LayerNorm uses 1e-5.")
    width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    text_cfg: dict[str, Any] = {
        "context_length": int(cfg.get("max_position_embeddings", 77)), "vocab_size": BPE_VOCAB_SIZE,
        "width": width, "heads": heads, "layers": int(layers or cfg["num_hidden_layers"]),
        "mlp_ratio": int(cfg["intermediate_size"]) / width,
    }
    if pad_id:
        text_cfg["tokenizer_kwargs"] = {"pad_id": int(pad_id)}
    return {"embed_dim": width, "quick_gelu": _ACTIVATIONS[act], "vision_cfg": dict(PLACEHOLDER_VISION), "text_cfg": text_cfg}


def hf_text_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers `CLIPTextConfig` kwargs for the text tower of an open_clip `model_cfg`."""
    text = model_cfg["text_cfg"]
    width = int(text.get("width", 512))
    pad = int((text.get("tokenizer_kwargs") or {}).get("pad_id", 0))
    return dict(
        vocab_size=int(text.get("vocab_size", BPE_VOCAB_SIZE)), hidden_size=width,
        intermediate_size=int(round(width * float(text.get("mlp_ratio", 4.0)))),
        num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", layer_norm_eps=1e-5,
        projection_dim=int(model_cfg.get("embed_dim", width)), pad_token_id=pad or 1, bos_token_id=49406, eos_token_id=2,
    )


_HF = "text_model."


def text_state_from_hf(state: Mapping[str, torch.Tensor], layers: int | None = None) -> dict[str, torch.Tensor]:
    """HF `CLIPTextModel` state dict -> open_clip text-tower keys (first `layers` layers; the rest dropped)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix(_HF)  # transformers < 5 and the hub's files: `text_model.*`; 5.x saves without it
        if name == "embeddings.position_ids":
            continue  # a buffer, not a weight
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name.split(".")[-1]] = value
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
            if m is None:
                raise InteropError(f"unexpected key '{key}' in a CLIPTextModel state dict.")
            i, rest = int(m.group(1)), m.group(2)
            if layers is not None and i >= layers:
                continue
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv:
                fused.setdefault(i, {})[f"{qkv.group(1)}.{qkv.group(2)}"] = value
                continue
            for hf, oc in (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                           ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")):
                if rest.startswith(hf):
                    out[f"transformer.resblocks.{i}.{oc}{rest[len(hf):]}"] = value
                    break
            else:
                raise InteropError(f"unexpected key '{key}' in a CLIPTextModel state dict.")
    for i, parts in fused.items():
        for kind, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"transformer.resblocks.{i}.attn.{name}"] = torch.cat([parts[f"{n}.{kind}"] for n in "qkv"])
    return out


def text_state_to_hf(state: Mapping[str, torch.Tensor], prefix: str = _HF) -> dict[str, torch.Tensor]:
    """open_clip text-tower keys -> HF `CLIPTextModel` state dict (image tower, projection and logit scale ignored);
    `prefix` "text_model." is the layout of the hub's SD files (every transformers version reads it)."""
    _HF = prefix
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out[_HF + "embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out[_HF + "embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out[_HF + "final_layer_norm." + key.split(".")[-1]] = value
        elif key.startswith("transformer.resblocks."):
            i, rest = key.split(".", 3)[2:]
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for n, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{_HF}encoder.layers.{i}.self_attn.{n}_proj.{kind}"] = chunk
                continue
            for oc, hf in (("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                           ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")):
                if rest.startswith(oc):
                    out[f"{_HF}encoder.layers.{i}.{hf}{rest[len(oc):]}"] = value
                    break
            else:
                raise InteropError(f"unexpected text-tower key '{key}'.")
    return out


def complete_clip_state(text_state: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The full open_clip `CLIP` state dict: the text tower given, an identity text projection, CLIP's initial
    logit scale and a zero placeholder image tower (shapes read from a model built on the meta device)."""
    from ldmkit.nn.clip import build_clip

    reference = build_clip(model_cfg=model_cfg, device="meta").state_dict()
    out = dict(text_state)
    width = int(model_cfg["text_cfg"]["width"])
    out.setdefault("text_projection", torch.eye(width, int(model_cfg["embed_dim"])))
    out.setdefault("logit_scale", torch.tensor(math.log(1 / 0.07)))
    for key, value in reference.items():
        if key.startswith("visual."):
            out[key] = torch.zeros(value.shape, dtype=value.dtype)
    missing, unexpected = sorted(set(reference) - set(out)), sorted(set(out) - set(reference))
    wrong = [k for k in set(reference) & set(out) if tuple(reference[k].shape) != tuple(out[k].shape)]
    if missing or unexpected or wrong:
        raise InteropError(f"text encoder weights do not fit its config: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                           f"shape mismatches {wrong[:4]}.")
    return out
