"""open_clip factory: build a CLIP by architecture name or inline config, load local pretrained weights,
and the image preprocessing every ldmkit CLIP shares.

Architecture configs are open_clip's own dicts (``embed_dim``, ``vision_cfg`` = ``CLIPVisionCfg``
fields, ``text_cfg`` = ``CLIPTextCfg`` fields), either looked up by name (``ViT-B-32``) or given
inline. ``build_clip`` records the resolved dict on the model (``model.ldmkit_arch``) so an
artifact can rebuild exactly the same network without knowing how it was first described.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# OpenAI CLIP's pixel statistics (open_clip's default preprocessing); kept for models trained here
# too, so every ldmkit CLIP (ours or downloaded) normalises images the same way.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
PRODUCER = "python train.py model=clip"


class ClipCheckpointError(ValueError):
    """A pretrained/initialisation checkpoint is missing, unreadable or does not fit the architecture."""


def _plain(value: Any) -> Any:
    """Recursively turn mappings/sequences (e.g. OmegaConf containers) into dicts/lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def resolve_clip_config(
    model_name: str | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """The full open_clip architecture dict for a model name or an inline config (plus overrides)."""
    import open_clip

    if (model_name is None) == (model_cfg is None):
        raise ValueError(
            f"build_clip needs exactly one of model_name (an open_clip architecture such as 'ViT-B-32') or "
            f"model_cfg (an inline dict with embed_dim, vision_cfg, text_cfg); got model_name={model_name!r}, "
            f"model_cfg={'set' if model_cfg is not None else None}."
        )
    if model_name is not None:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            close = [m for m in open_clip.list_models() if model_name.lower()[:5] in m.lower()][:8]
            raise ValueError(
                f"Unknown open_clip architecture model_name={model_name!r}. Similar names: {close or 'none'}; "
                "`open_clip.list_models()` lists all, or describe a small model inline with model_cfg."
            )
        cfg = copy.deepcopy(cfg)
    else:
        cfg = _plain(model_cfg)
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - cfg.keys()
        if missing:
            raise ValueError(f"model_cfg is missing {sorted(missing)}; it needs embed_dim, vision_cfg and text_cfg (open_clip's CLIPVisionCfg/CLIPTextCfg fields).")
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = int(context_length)
    if cfg["text_cfg"].get("hf_model_name") or cfg["text_cfg"].get("hf_tokenizer_name"):
        raise ValueError(
            f"{model_name or 'model_cfg'} uses a Hugging Face text tower/tokenizer, which needs a download; "
            "ldmkit supports open_clip's built-in text transformer (pick e.g. ViT-B-32, RN50, ViT-B-16)."
        )
    return cfg


def _instantiate(cfg: dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    import open_clip

    kwargs = copy.deepcopy(cfg)
    custom_text = kwargs.pop("custom_text", False)
    if "multimodal_cfg" in kwargs:
        raise ValueError("CoCa models (multimodal_cfg) are not supported by ldmkit's CLIP stage.")
    kwargs.pop("preprocess_cfg", None)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return cls(**kwargs)


def build_clip(
    model_name: str | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    pretrained_path: str | Path | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build an open_clip ``CLIP`` by architecture name or inline config, optionally loading local weights.

    ``pretrained_path``: a local open_clip checkpoint (.pt/.bin/.safetensors) or an ldmkit clip
    artifact folder; the error names the mismatching keys if it was trained with another architecture.
    ``device="meta"`` builds without allocating (for shape checks of big models).
    """
    arch = resolve_clip_config(model_name, model_cfg, image_size, context_length)
    model = _instantiate(arch, device)
    model.ldmkit_arch = {"model_name": model_name, "model_cfg": arch}
    from open_clip.model import set_model_preprocess_cfg

    preprocess = {"size": arch["vision_cfg"].get("image_size", 224), "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    preprocess.update(arch.get("preprocess_cfg") or {})  # e.g. SigLIP architectures declare mean = std = 0.5
    set_model_preprocess_cfg(model, preprocess)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    from ldmkit.nn.weights_file import UntrustedWeightsError, WeightsFileError, load_state_dict_file

    if path.is_dir():
        from ldmkit.artifacts import load_artifact

        tensors, _ = load_artifact(path, "clip")
        return tensors
    try:  # our weights_only reader, not open_clip's (see _load_open_clip_file)
        state_dict = load_state_dict_file(path, "CLIP checkpoint")
    except UntrustedWeightsError:
        raise
    except WeightsFileError as err:
        raise ClipCheckpointError(
            f"Cannot read pretrained checkpoint '{path}' ({err}). Pass an open_clip state dict "
            "(.pt/.bin/.safetensors) or an ldmkit clip artifact folder."
        ) from err
    if next(iter(state_dict), "").startswith("module."):  # saved from DistributedDataParallel
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _load_open_clip_file(model: nn.Module, path: Path) -> None:
    """open_clip 3.x `load_checkpoint` with the file read by `_read_state_dict` (weights_only=True):
    open_clip's own reader retries `torch.load` without `weights_only` after a TypeError, a full
    unpickle on torch < 2.6 or with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1. The key conversions are its own."""
    import open_clip
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if path.suffix in (".npz", ".npy"):  # big_vision (SigLIP) numpy weights: np.load refuses pickles
        open_clip.load_checkpoint(model, str(path), strict=True)
        return
    state_dict = convert_state_dict(model, _read_state_dict(path))  # OpenAI/MobileCLIP/timm layouts
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-d parameter
        if key in state_dict and getattr(model, key, None) is not None:
            state_dict[key] = state_dict[key].reshape(getattr(model, key).shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None and "logit_scale" in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])  # a CLIP checkpoint for SigLIP
    state_dict.pop("text.transformer.embeddings.position_ids", None)  # HF text towers: not a buffer since transformers 4.31
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local open_clip checkpoint (or ldmkit clip artifact) into ``model`` strictly."""
    from ldmkit.nn.weights_file import WeightsFileError

    path = Path(path)
    name = getattr(model, "ldmkit_arch", {}).get("model_name")
    arch = f"'{name}'" if name else "given by model_cfg"
    if not path.exists():
        raise ClipCheckpointError(
            f"pretrained_path='{path}' does not exist. Pass a local open_clip checkpoint file (.pt/.bin/.safetensors, "
            f"trained with the architecture {arch}) or an artifact folder written by `{PRODUCER}`; "
            "downloads by tag are not supported (no network), and pretrained_path=null trains from scratch."
        )
    try:
        if path.is_dir():
            model.load_state_dict(_read_state_dict(path), strict=True)
        else:  # open_clip's conversions of OpenAI/timm-style key layouts and position-embedding resizes
            _load_open_clip_file(model, path)
    except (ClipCheckpointError, WeightsFileError):
        raise
    except Exception as err:  # keys/shapes that do not fit (open_clip even asserts on some)
        state_dict = _read_state_dict(path)
        raise ClipCheckpointError(
            f"Checkpoint '{path}' does not match the architecture {arch}: {describe_mismatch(model, state_dict)}. "
            "Set model_name to the architecture the checkpoint was trained with (or fix model_cfg)."
        ) from err
    return model


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor], limit: int = 4) -> str:
    """Human summary of how a state dict differs from a model (missing/unexpected keys, shape clashes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:limit])})")
    return "; ".join(parts) or "incompatible state dict"


def clip_arch(model: nn.Module) -> dict[str, Any]:
    """The resolved architecture recorded by ``build_clip`` (``{"model_name", "model_cfg"}``)."""
    arch = getattr(model, "ldmkit_arch", None)
    if arch is None:
        raise ValueError("This CLIP model was not built by ldmkit.nn.clip.build_clip, so its architecture is unknown; build it with build_clip(model_name=...).")
    return arch


def preprocess_images(model: nn.Module, images: Tensor) -> Tensor:
    """Map batch images in [-1, 1] (B, 3, H, W) to the model's input: resize + CLIP mean/std."""
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(cfg.get("mean", CLIP_MEAN), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", CLIP_STD), device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def encode_images(model: nn.Module, images: Tensor, normalize: bool = True) -> Tensor:
    """Image embeddings (B, E) from batch images in [-1, 1] (any resolution; resized as needed)."""
    return model.encode_image(preprocess_images(model, images), normalize=normalize)


def encode_texts(model: nn.Module, tokenizer, captions: Sequence[str], normalize: bool = True) -> Tensor:
    """Text embeddings (B, E) of captions, tokenized on the model's device."""
    device = next(model.parameters()).device
    return model.encode_text(tokenizer(list(captions)).to(device), normalize=normalize)
