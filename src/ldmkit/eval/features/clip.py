"""CLIP image embeddings for CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better
Evaluation Metric for Image Generation"), preprocessed as the reference code does
(google-research `cmmd/io_util.py` `_center_crop_and_resize`: largest centred square, PIL bicubic
to the model's input size; `embedding.py`: values in [0, 1], CLIP mean/std) and L2-normalised.

Any CLIP works: an ldmkit clip artifact folder, or a local open_clip checkpoint file with its
architecture name (the paper uses ViT-L/14@336px, open_clip `ViT-L-14-336` with OpenAI weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.eval.features.common import file_digest, normalize, resize_like_pil


class CLIPImageFeatureExtractor(nn.Module):
    """Images (B, 3, H, W), uint8 or floats in [-1, 1] -> (B, D) unit-norm float32 embeddings."""

    def __init__(self, path: str | os.PathLike, model_name: str | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        from open_clip.model import get_model_preprocess_cfg

        from ldmkit.nn.clip import load_clip

        path = Path(path)
        self.net, _, config = load_clip(path, device=device, model_name=model_name)
        pre = get_model_preprocess_cfg(self.net)
        size = pre.get("size", 224)
        self.size = int(size if isinstance(size, int) else size[0])
        self.mean, self.std = tuple(pre.get("mean")), tuple(pre.get("std"))
        weights = path / "weights.safetensors" if path.is_dir() else path
        name = model_name or config.get("model_name") or "custom open_clip config"
        self.identity = {
            "network": f"open_clip {name} image tower", "weights": file_digest(weights),
            "preprocessing": {
                "reference": "google-research cmmd io_util._center_crop_and_resize + embedding._clip_preprocess",
                "resize": f"largest centred square, {self.size}x{self.size} bicubic, antialiased, as PIL",
                "normalise": {"mean": list(self.mean), "std": list(self.std)},
                "feature": "image embedding, L2-normalised",
            },
        }

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 3, size, size) normalised float32, on the CPU."""
        return normalize(resize_like_pil(images, self.size, center_crop=True), self.mean, self.std)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        embeddings = self.net.encode_image(self.preprocess(images).to(device)).float()  # (B, D)
        return F.normalize(embeddings, dim=-1)
