"""open_clip models for ldmkit: factory, tokenizer, contrastive losses, frozen text encoder, retrieval metrics.

Pure torch (no Lightning/Hydra). ``open_clip`` is imported lazily: it pulls in torchvision and
more (~10 s), and the losses/metrics here are used by processes that never build a model.

Architecture configs are open_clip's own dicts (``embed_dim``, ``vision_cfg`` = ``CLIPVisionCfg``
fields, ``text_cfg`` = ``CLIPTextCfg`` fields), either looked up by name (``ViT-B-32``) or given
inline. ``build_clip`` records the resolved dict on the model (``model.ldmkit_arch``) so an
artifact can rebuild exactly the same network without knowing how it was first described.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


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


def build_tokenizer(model: nn.Module | None = None, model_name: str | None = None, context_length: int | None = None):
    """open_clip's tokenizer for a model (BPE vocab shipped inside open_clip: works offline).

    Returns a callable ``tokenizer(list[str]) -> LongTensor (B, context_length)``; captions longer
    than the context are truncated, keeping start token + first L-2 BPE tokens + end token.
    """
    import open_clip

    pad_id = 0
    if model is not None:
        arch = clip_arch(model)
        model_name = arch["model_name"]
        text_cfg = arch["model_cfg"]["text_cfg"]
        context_length = context_length or text_cfg.get("context_length", 77)
        pad_id = int((text_cfg.get("tokenizer_kwargs") or {}).get("pad_id", 0))
    if model_name:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length or 77)
    return PaddedTokenizer(tokenizer, pad_id) if pad_id else tokenizer


class PaddedTokenizer:
    """open_clip's BPE tokenizer padding with `pad_id` after the end token instead of 0: SD 1.x's text
    encoder sees its padding positions as end tokens (49407), and the UNet attends to all 77 of them."""

    def __init__(self, tokenizer: Any, pad_id: int) -> None:
        self.tokenizer, self.pad_id = tokenizer, int(pad_id)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        ids = self.tokenizer(texts, context_length)  # (B, L), zeros after the end token
        seen_end = (ids == self.tokenizer.eot_token_id).long().cumsum(dim=1)
        after_end = torch.cat([torch.zeros_like(seen_end[:, :1]), seen_end[:, :-1]], dim=1) > 0
        return ids.masked_fill(after_end, self.pad_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


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


# --------------------------------------------------------------------------------------------
# Losses (open_clip loss.py style: stateless, features already gathered by the caller)
# --------------------------------------------------------------------------------------------


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 keeping gradients (what ``LightningModule.all_gather(sync_grads=True)``
    does); identity outside torch.distributed. Backward sums each rank's gradient for our slice."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _rows_and_offset(local: Tensor, gathered: Tensor | None, local_loss: bool, rank: int) -> tuple[Tensor, int]:
    if gathered is None or not local_loss:
        return (local if gathered is None else gathered), 0
    return local, rank * local.shape[0]


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3 pseudocode), unreduced per sample.

    Given this rank's features (B, E) and the features of all ranks (N, E), gathered with
    gradients: ``local_loss=False`` scores the full N x N similarity matrix on every rank;
    ``local_loss=True`` only this rank's B rows against all N columns (B x N memory), targets
    offset by ``rank * B``. Under DDP the mean over ranks of either equals the single-process loss
    on the concatenated batch, and DDP's gradient averaging yields the same gradients.
    """

    def __init__(self, local_loss: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        rank: int = 0,
    ) -> Tensor:
        images, offset = _rows_and_offset(image_features, all_image_features, self.local_loss, rank)
        texts, _ = _rows_and_offset(text_features, all_text_features, self.local_loss, rank)
        all_images = image_features if all_image_features is None else all_image_features
        all_texts = text_features if all_text_features is None else all_text_features
        logits_per_image = logit_scale * images @ all_texts.T  # (rows, N)
        logits_per_text = logit_scale * texts @ all_images.T  # (rows, N)
        if logit_bias is not None:
            logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
        labels = torch.arange(images.shape[0], device=images.device) + offset
        i2t = F.cross_entropy(logits_per_image, labels, reduction="none")
        t2i = F.cross_entropy(logits_per_text, labels, reduction="none")
        return (i2t + t2i) / 2  # (rows,)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, Alg. 1), unreduced per image row.

    loss_i = -sum_j log sigmoid(z_ij (t * x_i.y_j + b)), z_ij = +1 on the matching pair, -1 elsewhere;
    the mean over rows equals the paper's -sum_ij(...)/|B|. Gathering as in ``ClipLoss`` (this is
    open_clip's ``dist_impl='gather'`` with all columns in one matrix).
    """

    def __init__(self, local_loss: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        all_image_features: Tensor | None = None,
        all_text_features: Tensor | None = None,
        rank: int = 0,
    ) -> Tensor:
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs a learnable logit bias: give the model init_logit_bias (SigLIP uses -10, with "
                "init_logit_scale=log(10)) in model_cfg, as conf/model/clip_siglip.yaml does."
            )
        images, offset = _rows_and_offset(image_features, all_image_features, self.local_loss, rank)
        all_texts = text_features if all_text_features is None else all_text_features
        logits = logit_scale * images @ all_texts.T + logit_bias  # (rows, N)
        signs = -torch.ones_like(logits)
        rows = torch.arange(images.shape[0], device=images.device)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum(dim=1)  # (rows,)


# --------------------------------------------------------------------------------------------
# Frozen text encoder for the diffusion stage
# --------------------------------------------------------------------------------------------


class FrozenClipTextEncoder(nn.Module):
    """Frozen CLIP text tower: ``captions -> (per-token embeddings (B, L, D), pooled (B, E))``.

    ``clip_skip`` counts from the end like the txt2img parameter ``Clip skip``: 1 takes the last
    block's output, 2 the penultimate one (Stable Diffusion / A1111 convention); the final
    LayerNorm is applied to whichever layer is taken. ``pooled`` is always the model's own text
    embedding (last layer, pooled at the end token, projected; not L2-normalised), as SDXL uses.
    Holds only the text tower (the image tower is not part of this module's state); it shares the
    given model's text parameters and freezes them (pass a copy to keep training that model).
    """

    def __init__(self, model: nn.Module, tokenizer, clip_skip: int = 1) -> None:
        super().__init__()
        text = getattr(model, "text", None)
        if text is not None and not hasattr(text, "token_embedding"):
            raise ValueError(f"{type(text).__name__} text towers are not supported; use an open_clip architecture with its own text transformer.")
        tower = text if text is not None else model  # CustomTextCLIP keeps it under .text, CLIP flat
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", "argmax")
        self.eos_id = getattr(tower, "eos_id", None) or getattr(tower, "text_eos_id", None)
        if getattr(tower, "cls_emb", None) is not None:
            raise ValueError("Text towers with a CLS embedding (CoCa-style) are not supported by FrozenClipTextEncoder.")
        self.tokenizer = tokenizer
        layers = len(self.transformer.resblocks)
        if not 1 <= int(clip_skip) <= layers:
            raise ValueError(f"clip_skip={clip_skip} is out of range: this text encoder has {layers} layers, so use 1 (last layer) to {layers}.")
        self.clip_skip = int(clip_skip)
        self.context_length = int(self.positional_embedding.shape[0])
        self.context_dim = int(self.positional_embedding.shape[1])
        proj = self.text_projection
        self.pooled_dim = self.context_dim if proj is None else int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenClipTextEncoder:
        return super().train(False)  # frozen: a parent's .train() must not switch it back

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        return self.tokenizer(list(captions)).to(self.positional_embedding.device)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        tokens = self.tokenize(captions)  # (B, L)
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast) + self.positional_embedding.to(cast)  # (B, L, D)
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        take = len(self.transformer.resblocks) - self.clip_skip  # block index whose output is used
        hidden = x
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x, attn_mask=self.attn_mask)
            if i == take:
                hidden = x
        if not batch_first:
            x, hidden = x.transpose(0, 1), hidden.transpose(0, 1)
        tokens_emb = self.ln_final(hidden)  # (B, L, D)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)  # (B, D)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection  # (B, E)
        return tokens_emb, pooled


# --------------------------------------------------------------------------------------------
# Loading trained models (artifact folders or local open_clip checkpoints)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Evaluation: retrieval recall and zero-shot classification
# --------------------------------------------------------------------------------------------


def caption_ids(captions: Sequence[str]) -> Tensor:
    """Stable int64 id per caption string (equal captions, equal ids) that can be all-gathered."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little", signed=True) for c in captions], dtype=torch.long)


def _recall_one_way(queries: Tensor, candidates: Tensor, query_ids: Tensor, cand_ids: Tensor, ks: Sequence[int], chunk: int) -> dict[int, Tensor]:
    hits = {k: torch.zeros((), device=queries.device) for k in ks}
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ candidates.T  # (q, N)
        positive = query_ids[start : start + chunk, None] == cand_ids[None, :]
        best_positive = sims.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)
        better = (sims > best_positive).sum(dim=1)  # candidates ranked strictly above the best match
        for k in ks:
            hits[k] = hits[k] + (better < k).sum()
    return {k: v / queries.shape[0] for k, v in hits.items()}


def retrieval_recall(image_features: Tensor, text_features: Tensor, ids: Tensor | None = None, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, Tensor]:
    """Image→text and text→image recall@k over N pairs (row i of both is one pair).

    A retrieved item counts as correct if its caption equals the query's (``ids`` from
    ``caption_ids``; None: only the paired item), so duplicate captions in synthetic data do not
    turn ties into arbitrary misses. Ties rank in the query's favour: the result does not depend
    on the order of samples, which keeps single- and multi-process evaluation equal.
    """
    n = image_features.shape[0]
    ids = torch.arange(n, device=image_features.device) if ids is None else ids.to(image_features.device)
    i2t = _recall_one_way(image_features, text_features, ids, ids, ks, chunk)
    t2i = _recall_one_way(text_features, image_features, ids, ids, ks, chunk)
    out = {f"i2t_R@{k}": v for k, v in i2t.items()}
    out.update({f"t2i_R@{k}": v for k, v in t2i.items()})
    return out


@dataclass
class ZeroShotTask:
    """Zero-shot classification by prompts: one prompt per combination of attribute values.

    ``classes`` maps attribute name → values, ``template`` formats a combination into a prompt
    (e.g. ``"a {colour} {shape}"``), ``target(attributes) -> {name: value} | None`` reads a
    sample's true values (None: not applicable, e.g. several objects in the image).
    """

    name: str
    template: str
    classes: dict[str, list[Any]]
    target: Callable[[dict[str, Any]], dict[str, Any] | None]
    keys: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = list(self.classes)

    def combinations(self) -> Tensor:
        """(P, K) value indices of every prompt, in ``prompts()`` order."""
        return torch.tensor(list(itertools.product(*(range(len(v)) for v in self.classes.values()))), dtype=torch.long)

    def prompts(self) -> list[str]:
        return [self.template.format(**dict(zip(self.keys, values))) for values in itertools.product(*self.classes.values())]

    def targets(self, attributes: Sequence[dict[str, Any]]) -> Tensor:
        """(B, K) true value indices per sample, -1 where not applicable."""
        rows = []
        for attrs in attributes:
            truth = self.target(attrs or {})
            try:
                rows.append([self.classes[k].index(truth[k]) for k in self.keys] if truth is not None else [-1] * len(self.keys))
            except (KeyError, ValueError):
                rows.append([-1] * len(self.keys))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(self.keys))


def zero_shot_accuracy(image_features: Tensor, prompt_features: Tensor, combinations: Tensor, targets: Tensor, keys: Sequence[str]) -> dict[str, Tensor]:
    """Accuracy per attribute and for all at once (``"_".join(keys)``) of the best-scoring prompt.

    image_features (N, E) and prompt_features (P, E) L2-normalised; combinations (P, K); targets (N, K)
    with -1 rows ignored. Returns an empty dict if no sample is applicable.
    """
    valid = (targets >= 0).all(dim=1)
    if not bool(valid.any()):
        return {}
    best = (image_features[valid] @ prompt_features.T).argmax(dim=1)  # (n,)
    predicted = combinations.to(best.device)[best]  # (n, K)
    correct = predicted == targets[valid].to(best.device)  # (n, K)
    out = {key: correct[:, i].float().mean() for i, key in enumerate(keys)}
    if len(keys) > 1:
        out["_".join(keys)] = correct.all(dim=1).float().mean()
    return out
