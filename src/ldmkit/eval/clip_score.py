"""CLIP score and attribute accuracy of sampled images against their prompts.

CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1 with w = 100, as torchmetrics):
    100 * max(cos(E_img, E_txt), 0), averaged over image/prompt pairs.
The scoring model is passed in (encoder callables or an open_clip model + tokenizer), and its
name travels with the score so reports say which model scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ImageEncoder = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [-1, 1] -> (B, D)
TextEncoder = Callable[[Sequence[str]], Tensor]  # B prompts -> (B, D)
AttributePredictor = Callable[[Tensor], list[dict[str, Any]]]  # images -> [{"objects": [...]}, ...]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_preprocess(
    image_size: int | tuple[int, int],
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    interpolation: str = "bicubic",
) -> Callable[[Tensor], Tensor]:
    """[-1, 1] images -> CLIP input: resize the shortest side, centre-crop to `image_size` (as
    open_clip's eval transform), clamp to [0, 1] (as its uint8 PIL path does), normalise."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
        h, w = x.shape[-2:]
        if (h, w) != (height, width):
            scale = max(height / h, width / w)
            size = (max(height, round(h * scale)), max(width, round(w * scale)))
            x = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)
            top, left = (size[0] - height) // 2, (size[1] - width) // 2
            x = x[..., top : top + height, left : left + width]
        x = x.clamp(0, 1)
        return (x - mean_t.to(x.device)) / std_t.to(x.device)

    return preprocess


def open_clip_encoders(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], Tensor],
    preprocess: Callable[[Tensor], Tensor] | None = None,
) -> tuple[ImageEncoder, TextEncoder]:
    """Image and text encoders from an open_clip model; `preprocess` defaults to the model's own
    image size / mean / std (open_clip's `preprocess_cfg`)."""
    if preprocess is None:
        cfg = _open_clip_preprocess_cfg(model)
        preprocess = clip_image_preprocess(cfg["size"], cfg["mean"], cfg["std"], cfg["interpolation"])

    def device() -> torch.device:
        return next(model.parameters()).device

    @torch.no_grad()
    def encode_images(images: Tensor) -> Tensor:
        return model.encode_image(preprocess(images.to(device())))

    @torch.no_grad()
    def encode_texts(texts: Sequence[str]) -> Tensor:
        return model.encode_text(tokenizer(list(texts)).to(device()))

    return encode_images, encode_texts


def _open_clip_preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    cfg.setdefault("size", getattr(visual, "image_size", 224))
    cfg.setdefault("mean", getattr(visual, "image_mean", None) or OPENAI_MEAN)
    cfg.setdefault("std", getattr(visual, "image_std", None) or OPENAI_STD)
    cfg.setdefault("interpolation", "bicubic")
    if cfg["interpolation"] not in ("bicubic", "bilinear", "nearest"):
        cfg["interpolation"] = "bicubic"
    return cfg


class CLIPScore:
    """Streaming CLIP score: `update(images, prompts)` per batch, `compute()` at the end."""

    def __init__(self, encode_images: ImageEncoder, encode_texts: TextEncoder, model_name: str):
        self.encode_images = encode_images
        self.encode_texts = encode_texts
        self.model_name = model_name
        self.reset()

    @classmethod
    def from_open_clip(
        cls,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], Tensor],
        model_name: str,
        preprocess: Callable[[Tensor], Tensor] | None = None,
    ) -> CLIPScore:
        return cls(*open_clip_encoders(model, tokenizer, preprocess), model_name=model_name)

    def reset(self) -> None:
        self.total = 0.0
        self.num_samples = 0

    @torch.no_grad()
    def update(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Adds the batch; returns its per-pair scores (B,)."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIPScore.update got {len(images)} images but {len(prompts)} prompts")
        image_emb = self.encode_images(images).float()  # (B, D)
        text_emb = self.encode_texts(prompts).float().to(image_emb.device)  # (B, D)
        scores = 100 * F.cosine_similarity(image_emb, text_emb, dim=-1).clamp(min=0)  # (B,)
        self.total += float(scores.double().sum())
        self.num_samples += len(scores)
        return scores

    def compute(self) -> float:
        if self.num_samples == 0:
            raise ValueError("CLIPScore.compute called before any update")
        return self.total / self.num_samples


class PromptAccuracy:
    """How often the objects a prompt asks for are in the image, per attribute and jointly.

    Targets and predictions are attribute dicts `{"objects": [{"shape": ..., "colour": ...}, ...]}`.
    Objects are matched as multisets (order-free): per attribute, correct = size of the multiset
    intersection of target and predicted values; "both" does the same on the tuple of all
    `attributes`, i.e. one predicted object carries every attribute right. Rates are over target
    objects. The predictor (a classifier, a CLIP zero-shot probe, ...) is pluggable.
    """

    def __init__(self, predictor: AttributePredictor | None = None, attributes: Sequence[str] = ("colour", "shape")):
        self.predictor = predictor
        self.attributes = tuple(attributes)
        self.correct: Counter[str] = Counter()
        self.total: Counter[str] = Counter()

    def update(self, images: Tensor, targets: Sequence[dict[str, Any]]) -> None:
        if self.predictor is None:
            raise ValueError("PromptAccuracy.update needs a predictor; pass one, or use update_predictions")
        self.update_predictions(self.predictor(images), targets)

    def update_predictions(self, predicted: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        if len(predicted) != len(targets):
            raise ValueError(f"{len(predicted)} predictions for {len(targets)} targets")
        for pred, target in zip(predicted, targets):
            pred_objects = (pred or {}).get("objects", [])
            target_objects = (target or {}).get("objects", [])
            keys = {attr: (attr,) for attr in self.attributes} | {"both": self.attributes}
            for name, attrs in keys.items():
                wanted = _values(target_objects, attrs)
                self.correct[name] += sum((wanted & _values(pred_objects, attrs)).values())
                self.total[name] += sum(wanted.values())

    def compute(self) -> dict[str, float] | None:
        """{"colour": rate, "shape": rate, "both": rate}, or None when no target had objects."""
        if not any(self.total.values()):
            return None
        return {name: self.correct[name] / self.total[name] if self.total[name] else float("nan")
                for name in (*self.attributes, "both")}


def _values(objects: Sequence[dict[str, Any]], attrs: tuple[str, ...]) -> Counter:
    """Multiset of the objects' values for `attrs` (objects missing one of them are left out)."""
    return Counter(
        tuple(obj.get(a) for a in attrs) for obj in objects if all(obj.get(a) is not None for a in attrs)
    )
