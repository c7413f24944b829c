"""Loading trained CLIP models (artifact folders or local open_clip checkpoints), and the facts an
artifact records for the next stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmkit.nn.clip.factory import CHECKPOINT_SUFFIXES, CLIP_MEAN, CLIP_STD, PRODUCER, build_clip, clip_arch, describe_mismatch
from ldmkit.nn.clip.text_encoder import FrozenClipTextEncoder
from ldmkit.nn.clip.tokenizer import build_tokenizer


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_clip(path: str | Path, device: str | torch.device = "cpu", model_name: str | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model (eval, frozen), tokenizer, config)`` from a clip artifact folder or a local open_clip
    checkpoint file (then ``model_name`` names its architecture, e.g. ``ViT-B-32``)."""
    from ldmkit.artifacts import ArtifactError, load_artifact

    path = Path(path)
    if path.suffix in CHECKPOINT_SUFFIXES and not path.is_dir():
        if not path.is_file():
            raise ArtifactError(
                f"No CLIP checkpoint at '{path}': the file does not exist. Pass an artifact folder written by "
                f"`{PRODUCER}` (its `artifact/` folder) or an existing open_clip checkpoint file with model_name=..."
            )
        if not model_name:
            raise ValueError(f"'{path}' is an open_clip checkpoint file; also pass model_name (its architecture, e.g. 'ViT-B-32').")
        model = build_clip(model_name=model_name, pretrained_path=path)
        config = artifact_config(model)
        return freeze(model.to(device)), build_tokenizer(model), config
    tensors, config = load_artifact(path, "clip")
    model = build_clip(model_name=None, model_cfg=config["model_cfg"])
    model.ldmkit_arch["model_name"] = config.get("model_name")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"'{path}': weights do not match its config.json ({describe_mismatch(model, tensors)}); re-export it with `{PRODUCER}`.") from err
    return freeze(model.to(device)), build_tokenizer(model), config


def load_text_encoder(path: str | Path, clip_skip: int = 1, model_name: str | None = None, device: str | torch.device = "cpu") -> FrozenClipTextEncoder:
    """Frozen text encoder (per-token + pooled embeddings) from a clip artifact or open_clip checkpoint."""
    model, tokenizer, _ = load_clip(path, device=device, model_name=model_name)
    return FrozenClipTextEncoder(model, tokenizer, clip_skip=clip_skip)


def artifact_config(model: nn.Module) -> dict[str, Any]:
    """Facts the next stages need to rebuild and use a CLIP model (stored in the artifact's config.json)."""
    from open_clip.model import get_model_preprocess_cfg

    arch = clip_arch(model)
    cfg = arch["model_cfg"]
    text_cfg = cfg["text_cfg"]
    pre = get_model_preprocess_cfg(model)
    size = pre.get("size", cfg["vision_cfg"].get("image_size", 224))
    return {
        "model_name": arch["model_name"],
        "model_cfg": cfg,
        "embed_dim": int(cfg["embed_dim"]),
        "text_width": int(text_cfg.get("width", 512)),
        "text_layers": int(text_cfg.get("layers", 12)),
        "context_length": int(text_cfg.get("context_length", 77)),
        "pooled_dim": int(cfg["embed_dim"]),
        "tokenizer": {"model_name": arch["model_name"], "context_length": int(text_cfg.get("context_length", 77))},
        "image_size": size if isinstance(size, int) else list(size),
        "image_mean": list(pre.get("mean", CLIP_MEAN)),
        "image_std": list(pre.get("std", CLIP_STD)),
        "image_input_range": [-1.0, 1.0],
        "logit_scale": float(model.logit_scale.detach().exp().reshape(-1)[0]),
    }
